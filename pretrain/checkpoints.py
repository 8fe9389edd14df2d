"""Which training checkpoints are complete: a checkpoint counts only once every rank has written all of it.

A checkpoint is the folder ``checkpoints/step<NNNNNNNN>/``: DeepSpeed's engine files plus one
``trainer_state_rank<r>.pt`` per rank (loader position, RNG states). After every rank has written its part, rank 0
lists the folder's files with their sizes in ``complete.json`` (the seal, written last and atomically), then
points ``latest`` at it. A job killed at any moment therefore leaves, at worst, one unsealed folder beside the
sealed ones; ``--resume`` takes the newest sealed checkpoint whose files still have their recorded sizes and
removes unsealed folders newer than it.

Kept out of checkpoints: frozen parameters (the text tower's weights; rebuilt from the config when the run is
resumed or exported).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from scmm.atomic import write_file

log = logging.getLogger("scmm.train")

SEAL = "complete.json"
LATEST = "latest"  # DeepSpeed's pointer file; zero_to_fp32 reads it
PREFIX = "step"


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def state_file(folder: Path, rank: int) -> Path:
    return folder / f"trainer_state_rank{rank}.pt"


@dataclass(frozen=True)
class Sealed:
    """A complete checkpoint."""

    folder: Path
    step: int
    world: int  # ranks that wrote it

    @property
    def tag(self) -> str:
        return self.folder.name


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != SEAL}


def seal(folder: Path, step: int, world: int) -> None:
    """Mark ``folder`` complete (rank 0, after every rank has written its part): flush its files to disk, write the
    seal, then move ``latest`` to it."""
    files = _files(folder)
    for name in files:
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    body = json.dumps({"step": step, "world_size": world, "files": files}, indent=1)
    write_file(folder / SEAL, lambda p: p.write_text(body))
    write_file(folder.parent / LATEST, lambda p: p.write_text(folder.name))


def read_seal(folder: Path) -> Sealed | None:
    """The checkpoint in ``folder`` if it is sealed and every recorded file still has its recorded size."""
    try:
        meta = json.loads((folder / SEAL).read_text())
        files, step, world = meta["files"], int(meta["step"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            log.warning("checkpoint %s: %s is missing or changed size since it was written", folder, name)
            return None
    if any(state_file(folder, r).name not in files for r in range(world)):
        return None
    return Sealed(folder, step, world)


def folders(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def newest_complete(ckpt_dir: Path) -> Sealed | None:
    for folder in reversed(folders(ckpt_dir)):
        sealed = read_seal(folder)
        if sealed is not None:
            return sealed
    return None


def clean(ckpt_dir: Path, keep: Sealed | None, keep_last: int) -> None:
    """Remove the folders that do not count (unsealed ones, left by a kill) and all but the ``keep_last`` newest
    sealed ones, never ``keep``; rank 0 only."""
    sealed = []
    for folder in folders(ckpt_dir):
        if keep is not None and folder == keep.folder:
            sealed.append(folder)
        elif read_seal(folder) is None:
            log.info("removing %s: an incomplete checkpoint (the run was stopped while writing it)", folder)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            sealed.append(folder)
    for folder in sealed[:-keep_last]:
        if keep is None or folder != keep.folder:
            shutil.rmtree(folder, ignore_errors=True)
