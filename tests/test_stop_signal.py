"""A training launch stops cleanly on request (DESIGN.md): SIGUSR1 or SIGTERM in the middle of a step, or
``train.max_wall_time``, ends it at the next step boundary with a complete checkpoint and exit status 3; ``--resume``
then ends with the weights and the metrics log of a run that was never stopped. No scheduler needed: the signal
comes from the process itself at a chosen step (tests/faults.py, SCMM_SIGNAL)."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_kill_resume import STEPS, _command, _config, _env

from conftest import read_metrics
from scmm.errors import EXIT_STOPPED
from scmm.pretrain import checkpoints
from scmm.pretrain.engine import TrainOptions


def _run(config: Path, *extra: str, sig: str | None = None) -> subprocess.CompletedProcess:
    env = _env()
    if sig:
        env["SCMM_SIGNAL"] = sig
    return subprocess.run(_command(config, *extra), capture_output=True, text=True, env=env, timeout=600)


def _sealed_steps(ckpt: Path) -> list[int]:
    return sorted(s.step for s in (checkpoints.read_seal(f) for f in checkpoints.folders(ckpt)) if s is not None)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five launches: about a minute alone, many more on a loaded machine
def test_a_signal_stops_with_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path: Path,
                                                                                 small_corpus: Path):
    ref = _config(tmp_path, small_corpus, "ref")
    r = _run(ref)
    assert r.returncode == 0, r.stderr[-3000:]

    cfg = _config(tmp_path, small_corpus, "stopped")
    ckpt = tmp_path / "stopped" / "checkpoints"
    # USR1 (a scheduler's warning before the time limit) in the middle of step 3: step 3 ends, is checkpointed
    # (save_every is 2: not a regular checkpoint step), and the launch exits 3 without exporting a model
    r = _run(cfg, "--resume", sig="USR1:3")
    assert r.returncode == EXIT_STOPPED, r.stderr[-3000:]
    assert "stopped on signal SIGUSR1 at step 3 of 8" in r.stderr and "error:" not in r.stderr
    assert (ckpt / "latest").read_text() == "step00000003" and 3 in _sealed_steps(ckpt)
    assert not (tmp_path / "stopped" / "model").exists()
    assert [row["step"] for row in read_metrics(tmp_path / "stopped")] == [1, 2, 3]
    # SIGTERM (preemption) in the resumed launch, on a regular checkpoint step: one checkpoint, exit 3
    r = _run(cfg, "--resume", sig="TERM:6")
    assert r.returncode == EXIT_STOPPED, r.stderr[-3000:]
    assert "(step 3)" in r.stderr and "stopped on signal SIGTERM at step 6 of 8" in r.stderr
    assert _sealed_steps(ckpt) == [6]  # keep_last 1
    r = _run(cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 6)" in r.stderr

    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "stopped")
    assert [row["step"] for row in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert rb["batch_digest"] == ra["batch_digest"]
        for key in ("loss", "contrastive", "matching", "reconstruction", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    wa = load_file(str(tmp_path / "ref" / "model" / "aligner.safetensors"))
    wb = load_file(str(tmp_path / "stopped" / "model" / "aligner.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_max_wall_time_stops_with_a_checkpoint_without_a_signal(tmp_path: Path, small_corpus: Path):
    """A tiny train.max_wall_time stops the launch after its first step."""
    data = yaml.safe_load(_config(tmp_path, small_corpus, "walltime").read_text())
    data["train"]["max_wall_time"] = 0.001
    timed = tmp_path / "walltime.yaml"
    timed.write_text(yaml.safe_dump(data))
    r = _run(timed)
    assert r.returncode == EXIT_STOPPED, r.stderr[-3000:]
    assert "stopped on train.max_wall_time (0.001 s) at step 1 of 8" in r.stderr
    assert _sealed_steps(tmp_path / "walltime" / "checkpoints") == [1]


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_max_wall_time_must_be_a_finite_number_of_seconds(value: float):
    with pytest.raises(ValueError, match="train.max_wall_time"):
        TrainOptions(max_wall_time=value)


def test_the_stop_signals_are_restored_after_the_loop():
    """fit() catches SIGUSR1/SIGTERM only while the loop runs; a run without DeepSpeed (init-lm) does not catch."""
    from scmm.pretrain.engine import Trainer

    model = torch.nn.Linear(2, 1)
    model.param_groups = lambda wd, lr: [{"params": list(model.parameters())}]
    trainer = Trainer(model, TrainOptions(steps=2, precision="fp32", warmup_steps=0), name="t", progress=False)
    seen = []

    def forward(module, batch, step):
        seen.append(signal.getsignal(signal.SIGUSR1))
        return {"loss": module(batch["x"]).pow(2).mean()}

    before = signal.getsignal(signal.SIGUSR1)
    trainer.fit(iter([{"x": torch.ones(1, 2), "cell_id": ["a"]}] * 2), forward)
    assert seen == [before, before] and signal.getsignal(signal.SIGUSR1) is before
