"""A stage-1 run killed with SIGKILL at any moment, then relaunched with --resume until it finishes, ends with the
weights and the metrics log of a run that was never interrupted (the 2-rank case is in test_pretrain.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, read_metrics

STEPS = 8


def _config(tmp_path: Path, corpus: Path, out: str) -> Path:
    cfg = {
        "name": "kill", "corpus": str(corpus), "out": str(tmp_path / out), "seed": 0,
        "model": {"cell_tower": {"d_model": 16, "nhead": 2, "d_hid": 32, "nlayers": 1, "dropout": 0.1},
                  "text_tower": {"max_length": 32, "freeze": True},
                  "qformer": {"num_queries": 2, "num_layers": 1, "embed_dim": 16}},
        "encoding": {"max_len": 16, "n_bins": 0},
        "loader": {"batch_size": 8, "shuffle_buffer": 64},
        "train": {"steps": STEPS, "lr": 2e-3, "warmup_steps": 2, "log_every": 1, "save_every": 2, "keep_last": 1,
                  "precision": "fp32"},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "faults.py"), "--config", str(config), *extra]


def _env(fault: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SCMM_FAULT", None)
    return {**env, "SCMM_FAULT": fault} if fault else env


def _run(config: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(config, *extra), capture_output=True, text=True, env=_env(fault), timeout=600)


def _kill_after(config: Path, seconds: float) -> int:
    """Launch with --resume, SIGKILL it after ``seconds`` (unless it finished); returns its exit status."""
    proc = subprocess.Popen(_command(config, "--resume"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


@pytest.mark.slow
def test_killed_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path: Path, small_corpus: Path):
    ref = _config(tmp_path, small_corpus, "ref")
    r = _run(ref)
    assert r.returncode == 0, r.stderr[-3000:]

    cfg = _config(tmp_path, small_corpus, "killed")
    ckpt = tmp_path / "killed" / "checkpoints"
    # a requeued job passes --resume from its first launch on: with no complete checkpoint it starts from step 0
    for fault in ("engine-files:2", "empty-state:2", "before-seal:2", "before-latest:2"):
        r = _run(cfg, "--resume", fault=fault)
        assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
        assert "no complete checkpoint" in r.stderr and not (ckpt / "latest").exists()
    r = _run(cfg, "--resume", fault="mid-clean:4")  # resumes from the sealed 2; killed while removing it after 4
    assert r.returncode == -signal.SIGKILL and "(step 2)" in r.stderr
    assert (ckpt / "latest").read_text() == "step00000004"

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for seconds in rng.uniform(3.0, 20.0, size=3):  # at random moments: start-up, steps, checkpoints, export
        _kill_after(cfg, float(seconds))
    assert time.perf_counter() - started < 120
    r = _run(cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "killed")
    assert [row["step"] for row in b] == list(range(1, STEPS + 1))  # each step once
    for ra, rb in zip(a, b):
        assert rb["batch_digest"] == ra["batch_digest"]
        for key in ("loss", "contrastive", "matching", "reconstruction", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    wa = load_file(str(tmp_path / "ref" / "model" / "aligner.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "model" / "aligner.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)

    # one complete checkpoint is kept (keep_last 1), sealed, without the frozen text tower's weights
    kept = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert kept == [f"step{STEPS:08d}"] and (ckpt / kept[0] / "complete.json").is_file()
    module = torch.load(ckpt / kept[0] / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and not any(k.startswith("text_tower.") for k in module)
    assert any(k.startswith("cell_tower.") for k in module)
