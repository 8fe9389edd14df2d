"""Which training checkpoints are complete: a checkpoint counts only once every rank has written all of it.

A checkpoint is the folder ``checkpoints/step<NNNNNNNN>/``: DeepSpeed's engine files plus one
``trainer_state_rank<r>.pt`` per rank (loader position, RNG states). After every rank has written its part, rank 0
lists the folder's files with their sizes in ``complete.json`` (the seal, written last and atomically), then
points ``latest`` at it. A job killed at any moment therefore leaves, at worst, one unsealed folder beside the
sealed ones; ``--resume`` takes the newest sealed checkpoint whose files still have their recorded sizes and
removes unsealed folders newer than it.

Kept out of checkpoints: frozen parameters (the text tower's weights; rebuilt from the config when the run is
resumed or exported).

A launch on another number of ranks resumes a ZeRO checkpoint through DeepSpeed's universal checkpoint
(:func:`universal`: every parameter's fp32 weights and optimizer moments, whole, made once per checkpoint under
``checkpoints/universal/<tag>/`` and removed once the new launch has sealed a checkpoint of its own).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from scmm.atomic import write_file, write_folder

log = logging.getLogger("scmm.train")

SEAL = "complete.json"
LATEST = "latest"  # DeepSpeed's pointer file; zero_to_fp32 reads it
PREFIX = "step"
UNIVERSAL = "universal"


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
    if keep is None or not (ckpt_dir / UNIVERSAL / keep.tag).is_dir():  # the launch has sealed its own
        shutil.rmtree(ckpt_dir / UNIVERSAL, ignore_errors=True)


def universal(sealed: Sealed) -> Path:
    """The folder to load ``sealed`` from as a DeepSpeed universal checkpoint (``load_universal``), converted
    with DeepSpeed's ``ds_to_universal`` the first time (rank 0 only; atomic: a killed conversion is redone)."""
    root = sealed.folder.parent / UNIVERSAL
    if not (root / sealed.tag / "zero").is_dir():
        from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415 - DeepSpeed only where it converts

        def convert(tmp: Path) -> None:
            args = argparse.Namespace(input_folder=str(sealed.folder), output_folder=str(tmp),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
                ds_to_universal.main(args)

        log.info("converting checkpoint %s to DeepSpeed's universal checkpoint (another number of ranks)",
                 sealed.folder)
        root.mkdir(exist_ok=True)
        write_folder(root / sealed.tag, convert)
    return root
