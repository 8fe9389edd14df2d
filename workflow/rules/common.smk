# Shared helpers of the rules: the run's folders, the stage configs resolved for them, resources per rule from the
# config, the training launcher, and the done-files (provenance) that link the rules.
import shlex
import sys

import yaml

REPO = Path(workflow.basedir).parent
PY = shlex.quote(sys.executable)  # the environment snakemake runs in (on a cluster: the jobs' too)
SCMM = f"{PY} -m scmm.cli"
PROVENANCE = f"{PY} -m scmm.provenance"
OUT = str(config["out"]).rstrip("/")
STAGES = ("corpus", "stage1", "lm", "stage2", "eval", "package", "annotate")
RESOURCE_KEYS = ("threads", "mem_mb", "runtime", "gpus", "nodes", "slurm_partition", "slurm_account",
                 "slurm_extra", "constraint", "rendezvous_port")
TRAINING_RULES = ("stage1", "stage2")


def done(stage):
    """The done-file of a stage: its provenance, written last."""
    return f"{OUT}/provenance/{stage}.json"


def repo_path(path):
    """A path of the config ("{out}" stands for the run's folder): as given when it exists from here or is made by
    the run, else relative to the repository (configs/...)."""
    if "{out}" in str(path):
        return str(path).replace("{out}", OUT)
    p = Path(str(path))
    return str(p) if p.is_absolute() or p.exists() or not (REPO / p).exists() else str(REPO / p)


def _merged(base, over):
    merged = dict(base)
    for k, v in (over or {}).items():
        merged[k] = _merged(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def stage_config(stage, folders, key="config"):
    """A stage's run config (a configs/*.yaml file, named by ``key``, with the `set:` overrides of the workflow
    config) resolved for this run: its corpus/model folders are this run's; relative file paths in it point into
    the repository."""
    entry = config[stage]
    if isinstance(entry, str):
        entry = {key: entry}
    with open(repo_path(entry[key])) as f:
        data = yaml.safe_load(f) or {}
    data = _merged(data, entry.get("set"))
    data.update(folders)
    if data.get("deepspeed"):
        data["deepspeed"] = repo_path(data["deepspeed"])
    return data


def res(rule, key, default=None):
    """A resource of a rule: config resources.<rule>.<key>, else resources.default.<key>, else ``default``."""
    table = config.get("resources") or {}
    for where in (table.get(rule) or {}, table.get("default") or {}):
        if key in where and where[key] is not None:
            return where[key]
    return default


def ranks_of(rule):
    """Training processes of a rule: one per GPU on each node (one on CPU)."""
    return int(res(rule, "nodes", 1)) * max(int(res(rule, "gpus", 0)), 1)


def resources_of(rule):
    """The rule's resources for Snakemake and its executor (SLURM: partition, account, GPUs per node, nodes, extra
    sbatch options such as --signal). A training rule of several ranks is a SLURM "mpi" job: its shell starts the
    ranks itself with srun (one task per GPU), so that the scheduler's signals reach every rank directly."""
    unknown = set((config.get("resources") or {}).get(rule) or {}) - set(RESOURCE_KEYS)
    if unknown:
        raise WorkflowError(f"resources.{rule}: unknown key(s) {', '.join(sorted(unknown))} "
                            f"(keys: {', '.join(RESOURCE_KEYS)})")
    out = {"mem_mb": int(res(rule, "mem_mb", 4000)), "runtime": int(res(rule, "runtime", 60))}
    gpus, nodes = int(res(rule, "gpus", 0)), int(res(rule, "nodes", 1))
    if gpus > 0:
        out["gres"] = f"gpu:{gpus}"  # per node
    if nodes > 1:
        out["nodes"] = nodes
    if rule in TRAINING_RULES and ranks_of(rule) > 1:
        out.update(tasks=ranks_of(rule), mpi="srun")
        if gpus > 0:
            out["tasks_per_gpu"] = 1
        out["cpus_per_task"] = max(1, threads_of(rule) // max(gpus, 1))
    else:
        out["cpus_per_task"] = threads_of(rule)  # what SLURM gives the job (also shown by a dry run)
    for key in ("slurm_partition", "slurm_account", "slurm_extra", "constraint"):
        if res(rule, key):
            out[key] = str(res(rule, key))
    return out


def threads_of(rule):
    return int(res(rule, "threads", 1))


def train_launcher(rule, module):
    """The command that starts a training script: one process; or, for several ranks, inside a SLURM allocation
    one srun task per GPU on every node (RANK, WORLD_SIZE, LOCAL_RANK from SLURM's task variables, the rendezvous at
    the allocation's first node), and outside SLURM torchrun on this machine."""
    ranks, gpus = ranks_of(rule), max(int(res(rule, "gpus", 0)), 1)
    if ranks <= 1:
        return f"{PY} -m {module}"
    port = int(res(rule, "rendezvous_port", 29500))
    env = ("export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID "
           "LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE MASTER_PORT=" + str(port) + "; "
           'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); '
           f'exec {PY} -m {module} "$@"')
    srun = (f"srun --ntasks {ranks} --ntasks-per-node {gpus} --kill-on-bad-exit=0 bash -c "
            f"{shlex.quote(env)} {module}")
    local = f"{PY} -m torch.distributed.run --standalone --nproc_per_node {ranks} -m {module}"
    # a shell function (braces doubled for Snakemake's formatting of the rule's shell)
    return (f'if [ -n "${{{{SLURM_JOB_ID:-}}}}" ]; then launch() {{{{ {srun} "$@"; }}}}; '
            f'else launch() {{{{ {local} "$@"; }}}}; fi\n        launch')


def training_shell(rule, module, cfg, after):
    """A training attempt: keep the run folder when the same config made it (else start afresh), launch with
    --resume (a fresh folder starts at step 0), forward SIGUSR1/SIGTERM to the launch (it checkpoints at the next
    step and exits 3; the rule is retried and the next attempt continues), then record the provenance."""
    launch = train_launcher(rule, module)
    return f"""
        {PROVENANCE} prepare {OUT}/{rule} {cfg} --after {' '.join(after)}
        set +e
        {launch} --config {cfg} --resume &
        pid=$!
        trap 'kill -USR1 $pid 2>/dev/null' USR1
        trap 'kill -TERM $pid 2>/dev/null' TERM
        while true; do wait $pid; status=$?; kill -0 $pid 2>/dev/null || break; done
        set -e
        if [ $status -ne 0 ]; then echo "{rule}: the launch exited with status $status" >&2; exit $status; fi
    """


def stage_provenance(stage, cfg, inputs, outputs):
    return (f"{PROVENANCE} record --stage {stage} --config {cfg} --inputs {' '.join(inputs)} "
            f"--outputs {' '.join(outputs)} --out {done(stage)}")


def queries():
    """The query files to annotate (and describe): name -> h5ad; each gives <out>/<name>.h5ad."""
    return dict((config.get("annotate") or {}).get("queries") or {})


def all_targets():
    targets = [done(s) for s in ("corpus", "stage1", "lm", "stage2", "eval", "package")]
    targets += [f"{OUT}/{name}.h5ad" for name in queries()]
    return targets
