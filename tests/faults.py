"""Stage-1 training (``pretrain/train.py``'s command line) with a SIGKILL injected at one point of a checkpoint write.

Used by the kill tests in place of ``pretrain/train.py``. ``SCMM_FAULT=<point>:<step>[:<rank>]`` kills the process
(rank ``rank``, default every rank) when the checkpoint of ``step`` reaches ``point``:

* ``engine-files``: DeepSpeed's files are written, this rank's trainer state is not;
* ``empty-state``: this rank's trainer state is left at 0 bytes under its final name (as a non-atomic write would);
* ``before-seal``: every rank's part is written, the seal is not;
* ``before-latest``: the seal is written, ``latest`` still names the previous checkpoint;
* ``mid-clean``: while the checkpoints beyond ``keep_last`` are being removed (one file of the oldest is gone).

``SCMM_SIGNAL=<NAME>:<step>`` sends this process the signal ``SIG<NAME>`` (USR1, TERM) in the middle of that step (while
its first micro-batch is checked), as a scheduler would before a time limit or on preemption.

Two recorders for the tests of resuming on another number of ranks: ``SCMM_CELL_LOG=<file>`` appends one JSON line
per batch a rank's loader delivers (rank, split, epoch, cell ids) to ``<file>.rank<r>``; ``SCMM_DUMP=<file>`` writes, on
rank 0, every trained parameter's full fp32 weights and AdamW moments (``deepspeed.utils.safe_get_full_*``) right
after ``--resume`` has loaded a checkpoint (``<file>.resumed``) and after each checkpoint (``<file>.step<N>``).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from scmm.data_pipeline.loader import CorpusLoader
from scmm.pretrain import checkpoints, engine
from scmm.pretrain.train import main

POINTS = ("engine-files", "empty-state", "before-seal", "before-latest", "mid-clean")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(point: str, step: int, rank: int | None) -> None:
    if point not in POINTS:
        raise SystemExit(f"unknown fault point {point}")
    if rank is not None and int(os.environ.get("RANK", 0)) != rank:
        return
    tag = checkpoints.tag_of(step)
    write_file, seal, clean = engine.write_file, checkpoints.seal, checkpoints.clean

    def engine_write(path: Path, write):
        if path.parent.name == tag and path.name.startswith("trainer_state"):
            if point == "engine-files":
                die()
            if point == "empty-state":
                path.write_bytes(b"")
                die()
        return write_file(path, write)

    def seal_then_maybe_die(folder: Path, step_: int, world: int) -> None:
        if folder.name == tag and point == "before-seal":
            die()
        if folder.name == tag and point == "before-latest":
            checkpoints.write_file = lambda path, write: die() if path.name == checkpoints.LATEST else \
                write_file(path, write)
        seal(folder, step_, world)

    def clean_and_maybe_die(ckpt_dir: Path, keep, keep_last: int) -> None:
        if point == "mid-clean" and keep is not None and keep.folder.name == tag:
            oldest = checkpoints.folders(ckpt_dir)[0]
            next(p for p in sorted(oldest.rglob("*.pt"))).unlink()
            die()
        clean(ckpt_dir, keep, keep_last)

    engine.write_file = engine_write
    checkpoints.seal = seal_then_maybe_die
    checkpoints.clean = clean_and_maybe_die


def signal_at(name: str, step: int) -> None:
    finite = engine.Trainer._finite

    def checked(self, loss, ids):
        if self.step + 1 == step and not getattr(self, "_signalled", False):
            self._signalled = True
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return finite(self, loss, ids)
    engine.Trainer._finite = checked


def record_cells(path: str) -> None:
    iterate = CorpusLoader.__iter__

    def logged(self):
        with open(f"{path}.rank{self.rank}", "a") as f:
            for batch in iterate(self):
                f.write(json.dumps({"rank": self.rank, "split": self.split, "epoch": self.epoch,
                                    "cells": batch["cell_id"]}) + "\n")
                f.flush()
                yield batch
    CorpusLoader.__iter__ = logged


def _dump(trainer: engine.Trainer, path: str) -> None:
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    state, zero = {}, trainer.engine.zero_optimization_stage()
    if zero in (1, 2):
        # DeepSpeed links each parameter to its AdamW moments after the optimizer's first group has stepped, so the
        # later groups' links stay empty (deepspeed 0.19.8); link again now that every group has its moments
        trainer.engine.optimizer._hp_optimizer_states_linked = False
        trainer.engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in trainer.engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if zero:  # every rank joins the gathers
            state[name] = [safe_get_full_fp32_param(p)] + [safe_get_full_optimizer_state(p, k)
                                                           for k in ("exp_avg", "exp_avg_sq")]
        else:  # the client AdamW holds the whole state in each process
            moments = trainer.engine.optimizer.state[p]
            state[name] = [p.detach().float().clone(), moments["exp_avg"].clone(), moments["exp_avg_sq"].clone()]
    if trainer.rank == 0:
        torch.save(state, path)


def record_state(path: str) -> None:
    resume, save = engine.Trainer.resume, engine.Trainer.save_checkpoint

    def resumed(self):
        step = resume(self)
        _dump(self, f"{path}.resumed")
        return step

    def saved(self):
        save(self)
        _dump(self, f"{path}.step{self.step}")
    engine.Trainer.resume, engine.Trainer.save_checkpoint = resumed, saved


if __name__ == "__main__":
    if os.environ.get("SCMM_CELL_LOG"):
        record_cells(os.environ["SCMM_CELL_LOG"])
    if os.environ.get("SCMM_DUMP"):
        record_state(os.environ["SCMM_DUMP"])
    if os.environ.get("SCMM_SIGNAL"):
        name, at = os.environ["SCMM_SIGNAL"].split(":")
        signal_at(name, int(at))
    fault = os.environ.get("SCMM_FAULT")
    if fault:
        point, step, *rank = fault.split(":")
        inject(point, int(step), int(rank[0]) if rank else None)
    sys.exit(main(sys.argv[1:]))
