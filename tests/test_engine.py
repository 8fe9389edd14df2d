"""The training engine's guard rails: complete checkpoints only, the metrics log cut back on resume, NaN/inf
losses skipped then stopping the run (one process, no DeepSpeed: fast)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scmm.atomic import remove_stale, temp_dir_beside
from scmm.errors import ScmmError
from scmm.pretrain import checkpoints
from scmm.pretrain.engine import Trainer, TrainOptions, _cut_metrics


def _checkpoint(ckpt_dir: Path, step: int, world: int = 1, sealed: bool = True) -> Path:
    folder = ckpt_dir / checkpoints.tag_of(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    for r in range(world):
        checkpoints.state_file(folder, r).write_bytes(b"y" * 10)
    if sealed:
        checkpoints.seal(folder, step, world)
    return folder


def test_only_sealed_checkpoints_with_intact_files_count(tmp_path: Path):
    ckpt = tmp_path / "checkpoints"
    assert checkpoints.newest_complete(ckpt) is None  # no folder at all: a first launch with --resume
    two = _checkpoint(ckpt, 2, world=2)
    assert (ckpt / "latest").read_text() == "step00000002"
    assert json.loads((two / "complete.json").read_text())["files"]["trainer_state_rank1.pt"] == 10
    _checkpoint(ckpt, 4, sealed=False)  # killed before the seal
    six = _checkpoint(ckpt, 6)
    (six / "mp_rank_00_model_states.pt").write_bytes(b"x" * 50)  # cut short after sealing (a disk error)
    found = checkpoints.newest_complete(ckpt)
    assert found is not None and (found.step, found.world, found.tag) == (2, 2, "step00000002")
    checkpoints.clean(ckpt, found, keep_last=2)
    assert [p.name for p in checkpoints.folders(ckpt)] == ["step00000002"]
    # a seal that names a rank's state it does not list is not complete either
    (two / "trainer_state_rank1.pt").unlink()
    assert checkpoints.newest_complete(ckpt) is None


def test_clean_keeps_the_newest_sealed_checkpoints(tmp_path: Path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _checkpoint(ckpt, step)
    checkpoints.clean(ckpt, checkpoints.read_seal(ckpt / "step00000008"), keep_last=2)
    assert [p.name for p in checkpoints.folders(ckpt)] == ["step00000006", "step00000008"]


def test_metrics_log_is_cut_back_to_the_resumed_step(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    _cut_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_stale_temporary_entries_of_killed_processes_are_removed(tmp_path: Path):
    out = tmp_path / "corpus"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = temp_dir_beside(out)  # this process: kept
    host = live.name.split("-")[1]
    stale = tmp_path / f".corpus.tmp-{host}-{dead}-abc123"
    stale.mkdir()
    (stale / "shard.zarr").write_text("half written")
    other_host = tmp_path / f".corpus.tmp-otherhost-{dead}-abc123"
    other_host.mkdir()
    other_output = tmp_path / f".other.tmp-{host}-{dead}-abc123"
    other_output.mkdir()
    assert remove_stale(out) == [stale]
    assert not stale.exists() and live.exists() and other_host.exists() and other_output.exists()


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()

    def param_groups(self, weight_decay: float, lr: float) -> list[dict]:
        return [{"params": [self.w], "weight_decay": 0.0}]


def _batches(bad: set[int]):
    i = 0
    while True:
        yield {"cell_id": [f"c{i}a", f"c{i}b"], "x": torch.full((3,), float("nan") if i in bad else 1.0)}
        i += 1


def _forward(module, batch: dict, step: int) -> dict:
    return {"loss": module(batch["x"])}


def test_a_nonfinite_loss_skips_the_batch(caplog):
    model = _Toy()
    opts = TrainOptions(steps=4, lr=0.1, warmup_steps=0, precision="fp32", log_every=1, max_bad_batches=2)
    trainer = Trainer(model, opts, name="toy", progress=False)
    with caplog.at_level("WARNING", logger="scmm.train"):
        trainer.fit(_batches({1, 2}), _forward)
    assert trainer.step == 4 and trainer.skipped == 2
    assert all(torch.isfinite(model.w)) and not torch.equal(model.w.detach(), torch.ones(3))
    messages = [r.getMessage() for r in caplog.records]
    assert any("not finite at step 2" in m and "c1a, c1b" in m and "1 of at most 2" in m for m in messages)


def test_too_many_nonfinite_losses_stop_the_run():
    opts = TrainOptions(steps=4, lr=0.1, warmup_steps=0, precision="fp32", max_bad_batches=1)
    trainer = Trainer(_Toy(), opts, name="toy", progress=False)
    with pytest.raises(ScmmError, match=r"not finite at step 1 on rank 0 \(batch of c1a, c1b\); 2 batches"):
        trainer.fit(_batches({0, 1}), _forward)


@pytest.mark.parametrize("key", ["max_bad_batches", "threads"])
def test_negative_counts_are_rejected(key: str):
    with pytest.raises(ValueError, match=key):
        TrainOptions(**{key: -1})



def test_metrics_window_logs_tokens_per_second_only_when_a_forward_counts_tokens(tmp_path, monkeypatch):
    """A stage-2 forward reports its LLM input tokens; the window sums them over micro-steps and logs their rate
    over the window's wall time; a forward without tokens (stage 1) logs no such key."""
    from scmm.pretrain import engine
    clock = iter([100.0, 104.0, 200.0, 202.0, 300.0])  # window start, flush, start, flush, start
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    window = engine.MetricsWindow(("lm",), "samples_per_s", tmp_path / "metrics.jsonl", rank=0, distributed=False)
    for tokens in (30, 50):
        window.add({"loss": torch.tensor(1.0), "lm": torch.tensor(2.0), "tokens": tokens}, n_items=4, ids=["a"])
    line = window.flush(step=1, epoch=0, lr=0.1)
    assert line["tokens_per_s"] == pytest.approx(80 / 4.0) and line["samples_per_s"] == pytest.approx(8 / 4.0)
    window.add({"loss": torch.tensor(1.0), "lm": torch.tensor(2.0)}, n_items=4, ids=["b"])
    assert "tokens_per_s" not in window.flush(step=2, epoch=0, lr=0.1)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
