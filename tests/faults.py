"""Stage-1 training (``pretrain/train.py``'s command line) with a SIGKILL injected at one point of a checkpoint write.

Used by the kill tests in place of ``pretrain/train.py``. ``SCMM_FAULT=<point>:<step>[:<rank>]`` kills the process
(rank ``rank``, default every rank) when the checkpoint of ``step`` reaches ``point``:

* ``engine-files``: DeepSpeed's files are written, this rank's trainer state is not;
* ``empty-state``: this rank's trainer state is left at 0 bytes under its final name (as a non-atomic write would);
* ``before-seal``: every rank's part is written, the seal is not;
* ``before-latest``: the seal is written, ``latest`` still names the previous checkpoint;
* ``mid-clean``: while the checkpoints beyond ``keep_last`` are being removed (one file of the oldest is gone).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

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


if __name__ == "__main__":
    fault = os.environ.get("SCMM_FAULT")
    if fault:
        point, step, *rank = fault.split(":")
        inject(point, int(step), int(rank[0]) if rank else None)
    sys.exit(main(sys.argv[1:]))
