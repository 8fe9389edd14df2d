"""Temporary folders and files beside an output, published later by one rename (atomic writes).

`tempfile.mkdtemp` / `mkstemp` create private entries (0700 / 0600); renamed into place they would stay
private, so a model folder or corpus on a shared cluster file system would be unreadable by the rest of the
group. These helpers give the temporary entry the permissions a plain `mkdir` / `open` would (the umask's).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["temp_dir_beside", "temp_file_beside"]


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
