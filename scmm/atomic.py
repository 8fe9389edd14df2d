"""Temporary folders and files beside an output, published later by one rename (atomic writes).

`tempfile.mkdtemp` / `mkstemp` create private entries (0700 / 0600); renamed into place they would stay
private, so a model folder or corpus on a shared cluster file system would be unreadable by the rest of the
group. These helpers give the temporary entry the permissions a plain `mkdir` / `open` would (the umask's).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["temp_dir_beside", "temp_file_beside", "publish_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_beside(out: str | os.PathLike, tag: str = "tmp") -> Path:
    """A new hidden folder ``.<name>.<tag>-XXXX`` in ``out``'s parent (created if missing), umask permissions."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def temp_file_beside(out: str | os.PathLike, suffix: str = "") -> Path:
    """A new empty hidden file ``.<name>.tmp-XXXX<suffix>`` beside ``out``, with umask permissions."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=suffix, dir=out.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is swapped out first, then deleted.

    Readers see either the old folder or the new one, never a mix (two renames on one file system).
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        trash = temp_dir_beside(out, tag="old")
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out
