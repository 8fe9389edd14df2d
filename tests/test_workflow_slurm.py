"""The workflow on a real one-node SLURM cluster (tests/slurm_cluster.py: Debian slurm-wlm + munge, started by the
fixture, skipped where the machine is not root or has no SLURM): the tiny workflow end to end through the SLURM
executor; then stage 1 is signalled mid-run (``scancel --signal=USR1 --batch``), checkpoints, exits 3, is
resubmitted, resumes and ends with the final weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from test_workflow import SNAKEMAKE, _assert_same_weights, tiny_config

from conftest import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(slurm_cluster.unavailable() is not None, reason=str(slurm_cluster.unavailable())),
              pytest.mark.skipif(not Path(SNAKEMAKE).is_file(), reason="snakemake is not installed")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield c
    finally:
        c.stop()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
            "PYTHONUNBUFFERED": "1"}


def _command(workdir: Path, cfg: Path, *targets: str) -> list[str]:
    return [SNAKEMAKE, *targets, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
            "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--configfile", str(cfg),
            "--slurm-no-account", "--latency-wait", "5"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:  # SIGINT: Snakemake cancels its jobs and exits (SIGTERM does not stop it)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_tiny_workflow_runs_end_to_end_through_the_slurm_executor(cluster, tmp_path: Path):
    cfg = tiny_config(tmp_path)
    started = time.monotonic()
    r = subprocess.run(_command(tmp_path, cfg), capture_output=True, text=True, env=_env(), timeout=1200)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:] + cluster.log("slurmctld")[-2000:]
    run = tmp_path / "run"
    for stage in ("corpus", "stage1", "lm", "stage2", "eval", "package"):
        assert (run / "provenance" / f"{stage}.json").is_file(), stage
    assert (run / "cells_annotated.h5ad").is_file() and (run / "report" / "tables.html").is_file()
    jobs = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert len(jobs) == 7, log[-3000:]  # corpus, stage1, lm, stage2, eval, package, annotate (configs: local)
    print(f"tiny workflow through SLURM: {len(jobs)} jobs in {time.monotonic() - started:.0f} s")

    # one HTML report with the evaluation's tables and plots
    r = subprocess.run([SNAKEMAKE, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(tmp_path),
                        "--configfile", str(cfg), "--report", str(tmp_path / "report.html")],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    page = (tmp_path / "report.html").read_text(errors="replace")
    assert "tables.html" in page and "confusion_matrix.png" in page


def _wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended (status {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _metrics_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _stage1_job() -> str | None:
    out = subprocess.run(["squeue", "-h", "-o", "%i %k %T"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        jobid, comment, state = (line.split() + ["", "", ""])[:3]
        if comment == "rule_stage1" and state == "RUNNING":
            return jobid
    return None


def test_stage1_signalled_mid_run_checkpoints_is_resubmitted_and_ends_as_an_uninterrupted_run(cluster,
                                                                                              tmp_path: Path):
    steps = 150  # about 0.2 s a step alone: the signal, sent at step 3, lands long before the end
    cfg = tiny_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["stage1"]["set"]["train"].update(steps=steps, save_every=10_000, log_every=1)
    cfg.write_text(yaml.safe_dump(data))
    run, t0, wall0 = tmp_path / "run", time.monotonic(), time.time()
    logs = tmp_path / ".snakemake" / "slurm_logs" / "rule_stage1"
    timeline = {}
    log_path = tmp_path / "snakemake.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(_command(tmp_path, cfg, str(run / "provenance" / "stage1.json")), stdout=log,
                                stderr=subprocess.STDOUT, env=_env())
    try:
        _wait_for("stage 1 to run", _stage1_job, proc)
        first = _stage1_job()
        timeline["submit"] = time.monotonic() - t0
        metrics = run / "stage1" / "metrics.jsonl"
        _wait_for("stage 1's third step", lambda: _metrics_step(metrics) >= 3, proc)
        at = _metrics_step(metrics)
        subprocess.run(["scancel", "--signal=USR1", "--batch", first], check=True)
        timeline["signal"] = time.monotonic() - t0
        _wait_for("the resubmitted stage-1 job", lambda: _stage1_job() not in (None, first), proc)
        timeline["resubmit"] = time.monotonic() - t0
        second_log = logs / f"{_stage1_job()}.log"
        _wait_for("the resumed launch", lambda: second_log.is_file() and "resumed from" in second_log.read_text(),
                  proc)
        timeline["resume"] = time.monotonic() - t0
        proc.wait(timeout=900)
        timeline["end"] = time.monotonic() - t0
    finally:
        _stop(proc)
    text = log_path.read_text()
    assert proc.returncode == 0, text[-6000:]
    first_log = (logs / f"{first}.log").read_text()
    stopped = re.search(rf"stage1: stopped on signal (SIG\w+) at step (\d+) of {steps} with a complete checkpoint",
                        first_log)
    assert stopped, first_log[-4000:]
    step = int(stopped.group(2))
    assert at <= step < steps
    seal = run / "stage1" / "checkpoints" / f"step{step:08d}" / "complete.json"
    timeline["checkpoint"] = seal.stat().st_mtime - wall0
    second = [p for p in logs.glob("*.log") if p.name != f"{first}.log"]
    assert len(second) == 1
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", second[0].read_text())
    assert resumed and int(resumed.group(1)) == step, second[0].read_text()[-4000:]
    assert re.findall(r"has been submitted with SLURM jobid (\d+)", text)[-2:] == [first, second[0].stem]

    # the same stage 1 never interrupted (by hand, the config the workflow resolved)
    ref = yaml.safe_load((run / "configs" / "stage1.yaml").read_text())
    ref["out"] = str(tmp_path / "ref")
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(ref))
    p = subprocess.run([sys.executable, "-m", "scmm.cli", "pretrain", "--config", str(tmp_path / "ref.yaml")],
                       capture_output=True, text=True, env=_env(), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_weights(tmp_path / "ref" / "model", run / "stage1" / "model", rtol=1e-5, atol=1e-6)
    timeline.update(signal_seen=stopped.group(1), checkpoint_step=step, jobs=[first, second[0].stem])
    (tmp_path / "timeline.json").write_text(json.dumps(timeline))
    print("SLURM stop/resume timeline (s since launch):", json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                                      for k, v in timeline.items()}))
