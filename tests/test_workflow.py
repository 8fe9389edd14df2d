"""The staged workflow (workflow/Snakefile): dry runs list the stages with their resources (the demo's config, and the
cluster example through the SLURM profile, which needs no cluster for -n); a tiny config run locally gives the same
corpus and models as the CLI commands run by hand, and a changed stage config reruns that stage and the ones after
it, nothing before."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_adata

SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
pytestmark = pytest.mark.skipif(shutil.which("snakemake", path=str(Path(sys.executable).parent)) is None,
                                reason="snakemake is not installed (pip install -e '.[workflow]')")


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the repository's workflow with ``workdir`` as Snakemake's working directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    return subprocess.run([SNAKEMAKE, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
                           *args], capture_output=True, text=True, env=env, timeout=timeout)


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run: rule -> number of jobs."""
    table = output[output.index("Job stats:"):].splitlines()[3:]
    stats = {}
    for line in table:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m or m.group(1) == "total":
            break
        stats[m.group(1)] = int(m.group(2))
    return stats


def rule_blocks(output: str) -> dict[str, str]:
    """The dry run's block of text per rule (its input, output, resources, shell command)."""
    blocks = re.split(r"\n(?=rule \w+:\n)", output)
    return {b.split(":", 1)[0][5:]: b for b in blocks if b.startswith("rule ")}


def tiny_config(tmp: Path, **top) -> Path:
    """A workflow config of tiny stages on a 400-cell CELLxGENE-schema h5ad (the repository's stage configs with
    `set:` overrides), one thread per rule."""
    h5ad = tmp / "cells.h5ad"
    if not h5ad.exists():
        make_adata(n_cells=400, donors=10).write_h5ad(h5ad)
    cfg = {
        "out": str(tmp / "run"), "retries": 2,
        "corpus": {"inputs": [str(h5ad)], "args": "--shard-size 64"},
        "stage1": {"config": "configs/stage1_demo.yaml", "set": {
            "model": {"cell_tower": {"d_model": 16, "nhead": 2, "d_hid": 32, "nlayers": 1},
                      "text_tower": {"max_length": 32},
                      "qformer": {"num_queries": 2, "num_layers": 1, "embed_dim": 16}},
            "encoding": {"max_len": 16}, "loader": {"batch_size": 8, "shuffle_buffer": 64},
            "train": {"steps": 4, "save_every": 2, "log_every": 1, "warmup_steps": 1, "precision": "fp32"}}},
        "lm": {"init": "configs/lm_demo.yaml", "set": {
            "tokenizer": {"vocab_size": 500},
            "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "num_key_value_heads": 2, "max_position_embeddings": 64},
            "data": {"batch_size": 4, "seq_len": 32},
            "train": {"steps": 2, "warmup_steps": 1, "log_every": 1, "precision": "fp32"}}},
        "stage2": {"config": "configs/stage2_demo.yaml", "set": {
            "model": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                      "bridge": {"decoder_hidden": 32}},
            "data": {"n_hvg": 12}, "loader": {"batch_size": 4, "shuffle_buffer": 64},
            "train": {"steps": 2, "save_every": 2, "log_every": 1, "warmup_steps": 1, "precision": "fp32"},
            "refit": {"steps": 2, "batch_size": 4, "log_every": 1}}},
        "eval": {"tasks": "annotate"},
        "annotate": {"queries": {"cells_annotated": str(h5ad)}, "describe": False},
        "resources": {"default": {"threads": 1, "mem_mb": 1500, "runtime": 10}},
        **top,
    }
    path = tmp / "workflow.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


DEMO_JOBS = {"all": 1, "corpus": 1, "stage1_config": 1, "stage1": 1, "lm_config": 1, "lm": 1, "stage2_config": 1,
             "stage2": 1, "eval": 1, "package": 1, "annotate": 1}


def test_dry_run_of_the_demo_lists_every_stage_with_its_resources(tmp_path: Path):
    r = snakemake(tmp_path, "-n", "-p", "--cores", "2", "--configfile", str(ROOT / "workflow/config/demo.yaml"),
                  "--config", f"out={tmp_path / 'demo'}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert job_stats(out) == DEMO_JOBS
    blocks = rule_blocks(out)
    for rule in ("corpus", "stage1", "lm", "stage2", "eval", "package", "annotate"):
        assert "threads: 2" in blocks[rule] and "runtime=30" in blocks[rule] and "mem_mb=4000" in blocks[rule], rule
    demo = tmp_path / "demo"
    assert f"scmm.cli data demo --out {demo}/corpus --h5ad {demo}/pbmc.h5ad --overwrite" in blocks["corpus"]
    assert f"-m scmm.pretrain.train --config {demo}/configs/stage1.yaml --resume &" in blocks["stage1"]
    assert f"-m scmm.finetune.train --config {demo}/configs/stage2.yaml --resume &" in blocks["stage2"]
    assert f"output: {demo}/annotated.h5ad" in blocks["annotate"]
    assert f"input: {demo}/pbmc.h5ad, {demo}/provenance/package.json" in blocks["annotate"]


def test_dry_run_of_the_cluster_example_through_the_slurm_profile(tmp_path: Path):
    for name in ("atlas_part1", "atlas_part2", "query"):  # the example's input files (empty: -n reads nothing)
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.h5ad").touch()
    r = snakemake(tmp_path, "-n", "-p", "--profile", str(ROOT / "workflow/profiles/slurm"),
                  "--configfile", str(ROOT / "workflow/config/cluster_example.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert job_stats(out) == {**DEMO_JOBS}
    blocks = rule_blocks(out)
    # stage 1: 2 nodes x 4 GPUs = 8 ranks, started by srun inside the allocation (one task per GPU), SIGTERM
    # 10 minutes before the time limit, retried with --resume
    s1 = blocks["stage1"]
    for part in ("mem_mb=256000", "runtime=1440", "gres=gpu:4", "nodes=2", "tasks=8", "mpi=srun", "tasks_per_gpu=1",
                 "cpus_per_task=8", "slurm_partition=gpu", "slurm_account=my_account",
                 "slurm_extra=--signal=TERM@600", "srun --ntasks 8 --ntasks-per-node 4",
                 "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID", "--resume &"):
        assert part in s1, part
    s2 = blocks["stage2"]
    assert "gres=gpu:4" in s2 and "tasks=4" in s2 and "nodes=" not in s2 and "srun --ntasks 4 --ntasks-per-node 4" in s2
    c = blocks["corpus"]
    assert "cpus_per_task=16" in c and "mem_mb=64000" in c and "slurm_partition=cpu" in c and "gres" not in c
    assert "data build data/atlas_part1.h5ad data/atlas_part2.h5ad --out runs/cluster/corpus --overwrite --jobs 16" in c
    assert "import-lm --out runs/cluster/lm --overwrite" in blocks["lm"]
    assert "gres=gpu:1" in blocks["annotate"] and "mpi" not in blocks["annotate"]
    assert "localrule" not in s1 and "rule stage1_config" in out  # configs are written on the submitting machine


def test_unknown_resource_keys_are_refused(tmp_path: Path):
    cfg = tiny_config(tmp_path, resources={"stage1": {"gpu": 2}})
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(cfg))
    assert r.returncode != 0 and "resources.stage1: unknown key(s) gpu" in r.stdout + r.stderr


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return {f.relative_to(folder).as_posix(): load_file(str(f)) for f in sorted(folder.rglob("*.safetensors"))}


def _assert_same_weights(a: Path, b: Path, rtol: float = 0, atol: float = 0) -> None:
    import torch
    wa, wb = _weights(a), _weights(b)
    assert wa and wa.keys() == wb.keys(), (a, sorted(wa), sorted(wb))
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for k in wa[name]:
            torch.testing.assert_close(wb[name][k], wa[name][k], rtol=rtol, atol=atol, msg=f"{name}:{k}")


@pytest.mark.slow
def test_the_tiny_workflow_gives_what_the_commands_by_hand_give(tmp_path: Path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    target = str(run / "provenance" / "stage2.json")
    r = snakemake(tmp_path, target, "--cores", "1", "--configfile", str(cfg))  # --configfile takes several
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]

    # by hand: the same commands on the configs the workflow resolved (its folders replaced by others)
    hand = tmp_path / "hand"
    resolved = {}
    for stage in ("stage1", "lm", "stage2"):
        data = yaml.safe_load((run / "configs" / f"{stage}.yaml").read_text())
        for key in ("corpus", "out", "stage1", "lm"):
            if key in data:
                data[key] = data[key].replace(str(run), str(hand))
        resolved[stage] = tmp_path / f"hand_{stage}.yaml"
        resolved[stage].write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for args in (["data", "build", str(tmp_path / "cells.h5ad"), "--out", str(hand / "corpus"), "--shard-size", "64"],
                 ["pretrain", "--config", str(resolved["stage1"])],
                 ["finetune", "init-lm", "--config", str(resolved["lm"])],
                 ["finetune", "--config", str(resolved["stage2"])]):
        p = subprocess.run([sys.executable, "-m", "scmm.cli", *args], capture_output=True, text=True, env=env,
                           timeout=900)
        assert p.returncode == 0, (args, p.stderr[-3000:])

    from scmm.provenance import checksum

    def manifest(corpus: Path) -> dict:  # its shards' checksums included; the build's time left out
        data = json.loads((corpus / "manifest.json").read_text())
        data.pop("created")
        return data
    assert manifest(run / "corpus") == manifest(hand / "corpus")
    for folder in ("stage1/model", "lm", "stage2/model"):
        _assert_same_weights(hand / folder, run / folder)

    # provenance: config, inputs' checksums, git commit, package versions
    prov = json.loads((run / "provenance" / "stage1.json").read_text())
    assert prov["config"]["text"] == (run / "configs" / "stage1.yaml").read_text()
    assert {i["path"] for i in prov["inputs"]} == {str(run / "provenance" / "corpus.json"), str(run / "corpus")}
    assert prov["outputs"][0]["sha256"] == checksum(run / "stage1" / "model")["sha256"]
    assert "torch" in prov["versions"] and "snakemake" in prov["versions"]
    assert prov["git"] is None or len(prov["git"]["commit"]) == 40

    # nothing to do when nothing changed; a changed stage-2 config reruns stage 2 and what follows, not stage 1
    r = snakemake(tmp_path, target, "-n", "--cores", "1", "--configfile", str(cfg))
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    data = yaml.safe_load(cfg.read_text())
    data["stage2"]["set"]["train"]["lr"] = 0.001
    cfg.write_text(yaml.safe_dump(data))
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert job_stats(r.stdout + r.stderr) == {"all": 1, "stage2_config": 1, "stage2": 1, "eval": 1, "package": 1,
                                             "annotate": 1}
    # a changed stage-1 config reruns stage 1 and everything after it (the LLM only depends on the corpus)
    data["stage1"]["set"]["train"]["lr"] = 0.002
    cfg.write_text(yaml.safe_dump(data))
    r = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(cfg))
    assert job_stats(r.stdout + r.stderr) == {"all": 1, "stage1_config": 1, "stage1": 1, "stage2_config": 1,
                                             "stage2": 1, "eval": 1, "package": 1, "annotate": 1}, r.stdout[-3000:]
