"""Atomic writes: outputs are written beside their destination under a temporary name, then renamed into place.

Every folder scmm writes (corpora, model folders, packages, indexes, evaluation folders) goes through
:func:`write_folder` or :func:`publish_dir`, every file through :func:`temp_file_beside` and ``os.replace``.

`tempfile.mkdtemp` / `mkstemp` create private entries (0700 / 0600); renamed into place they would stay
private, so a model folder or corpus on a shared cluster file system would be unreadable by the rest of the
group. These helpers give the temporary entry the permissions a plain `mkdir` / `open` would (the umask's).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from scmm.errors import ScmmError

__all__ = ["temp_dir_beside", "temp_file_beside", "publish_dir", "write_folder", "check_replaceable"]


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


def check_replaceable(out: str | os.PathLike, marker: str | None) -> None:
    """Refuse to replace an existing ``out`` unless it is an empty folder or holds ``marker`` (the file that makes
    it one of scmm's outputs of that kind): a wrong ``--out`` must never delete a user's folder."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ScmmError(f"output {out} exists and is not a folder")
    if marker is not None and not (out / marker).exists() and any(out.iterdir()):
        raise ScmmError(f"output {out} exists and is not what this command writes (no {marker}); refusing to replace "
                        f"it")


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike, marker: str | None = None) -> Path:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is swapped out first, then deleted.

    Readers see either the old folder or the new one, never a mix (two renames on one file system). ``marker``:
    see :func:`check_replaceable`.
    """
    tmp, out = Path(tmp), Path(out)
    check_replaceable(out, marker)
    if out.exists():
        trash = temp_dir_beside(out, tag="old")
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def write_folder(out: str | os.PathLike, write: Callable[[Path], None], marker: str | None = None,
                 merge: bool = False, owned: tuple[str, ...] = ()) -> Path:
    """Run ``write(tmp)`` in a temporary folder beside ``out``, then publish it as ``out``; on any failure nothing
    is left behind and an existing ``out`` is untouched.

    By default the whole folder is swapped in (:func:`publish_dir`): folders scmm owns entirely (models, corpora,
    packages, indexes). With ``merge`` an existing ``out`` keeps its other files: each written file replaces its
    namesake (``marker``, the file that says the output is complete, last), and the files named in ``owned`` that
    this run did not write are removed (an output folder a user browses, e.g. an evaluation's).
    """
    out = Path(out)
    if not merge:
        check_replaceable(out, marker)
    tmp = temp_dir_beside(out)
    try:
        write(tmp)
        if not merge or not out.exists():
            return publish_dir(tmp, out, None if merge else marker)
        if not out.is_dir():
            raise ScmmError(f"output {out} exists and is not a folder")
        written = sorted(tmp.iterdir(), key=lambda p: (p.name == marker, p.name))
        for path in written:
            os.replace(path, out / path.name)
        for name in set(owned) - {p.name for p in written}:
            if (out / name).is_file():
                (out / name).unlink()
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
