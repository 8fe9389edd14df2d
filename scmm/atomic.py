"""Atomic writes: outputs are written beside their destination under a temporary name, then renamed into place.

Every folder scmm writes (corpora, model folders, packages, indexes, evaluation folders) goes through
:func:`write_folder` or :func:`publish_dir`, every file through :func:`write_file`, :func:`file_beside` or
:func:`temp_file_beside` and :func:`publish_file`: ``os.replace`` is called here and nowhere else.

`tempfile.mkdtemp` / `mkstemp` create private entries (0700 / 0600); renamed into place they would stay
private, so a model folder or corpus on a shared cluster file system would be unreadable by the rest of the
group. These helpers give the temporary entry the permissions a plain `mkdir` / `open` would (the umask's).

A temporary name records the host and process that made it (``.<name>.tmp-<host>-<pid>-XXXX``): a process
killed mid-write leaves its temporary entry behind, and the next write of the same output removes the entries of
processes of this host that no longer run (:func:`remove_stale`). Entries of other hosts are left alone (their
processes cannot be checked from here) and logged.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scmm.errors import ScmmError, Terminated

log = logging.getLogger("scmm.atomic")

__all__ = ["temp_dir_beside", "temp_file_beside", "publish_dir", "publish_file", "file_beside", "write_folder",
           "check_replaceable", "write_file", "remove_stale", "request_termination", "check_not_terminated"]
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[^/]+)-(?P<pid>\d+)-[^-]+$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def _prefix(out: Path, tag: str) -> str:
    return f".{out.name}.{tag}-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary entries beside ``out`` left by killed processes of this host; returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    host, removed = _host(), []
    for entry in out.parent.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or m["name"] != out.name:
            continue
        if m["host"] != host:
            log.info("leaving %s: a temporary entry of another host (%s)", entry, m["host"])
        elif int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted run (process %s)", entry, m["pid"])
            removed.append(entry)
    return removed


def temp_dir_beside(out: str | os.PathLike, tag: str = "tmp") -> Path:
    """A new hidden folder ``.<name>.<tag>-<host>-<pid>-XXXX`` in ``out``'s parent (created if missing), umask
    permissions; stale ones of killed processes are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, tag), dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def temp_file_beside(out: str | os.PathLike, suffix: str = "") -> Path:
    """A new empty hidden file ``.<name>.tmp-<host>-<pid>-XXXX<suffix>`` beside ``out``, with umask permissions;
    stale ones of killed processes are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    fd, name = tempfile.mkstemp(prefix=_prefix(out, "tmp"), suffix=suffix, dir=out.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


_termination = threading.Event()  # a process's SIGTERM is process-wide state: see request_termination


def request_termination() -> None:
    """Record that the process was sent SIGTERM: from now on nothing is published (:class:`Terminated` instead).

    The signal handler raises :class:`Terminated` where the program happens to be; when that is a finaliser
    (``__del__``, a weakref callback) Python prints "Exception ignored" and carries on, and the command would
    finish and publish its output after all. Each publish checks this first.
    """
    _termination.set()


def check_not_terminated() -> None:
    """Raise :class:`Terminated` if :func:`request_termination` was called (also called between chunks, so that a
    lost exception stops a long write at its next chunk rather than at the end)."""
    if _termination.is_set():
        raise Terminated()


def publish_file(tmp: str | os.PathLike, out: str | os.PathLike, fsync: bool = False) -> Path:
    """Rename the finished file ``tmp`` (beside ``out``) to ``out``, with the umask's permissions (a temporary from
    :func:`temp_file_beside` has them already; one made by another library may not); ``fsync`` first flushes
    it to disk (a restart after a node failure then sees the whole file or the old one)."""
    tmp, out = Path(tmp), Path(out)
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    check_not_terminated()
    os.replace(tmp, out)
    return out


@contextmanager
def file_beside(out: str | os.PathLike, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """``with file_beside(out) as tmp: write(tmp)``: a temporary file beside ``out`` (:func:`temp_file_beside`),
    renamed to ``out`` when the block ends normally (:func:`publish_file`) and removed when it raises (an error,
    an interrupt, a termination), so ``out`` is the old file or the complete new one."""
    out = Path(out)
    tmp = temp_file_beside(out, suffix)
    try:
        yield tmp
        publish_file(tmp, out, fsync)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``out``, flush it to disk, then rename it to ``out``: readers
    (and a process restarted after a kill or a node failure) see the old file or the new one, never a part."""
    with file_beside(out, fsync=True) as tmp:
        write(tmp)
    return Path(out)


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
    check_not_terminated()
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
        check_not_terminated()
        for path in written:
            os.replace(path, out / path.name)
        for name in set(owned) - {p.name for p in written}:
            if (out / name).is_file():
                (out / name).unlink()
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
