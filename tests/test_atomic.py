"""Atomic outputs get the permissions a plain mkdir / open would give, not mkdtemp's private 0700 / 0600."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from scmm.atomic import publish_dir, temp_dir_beside, temp_file_beside, write_folder
from scmm.errors import ScmmError


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = write_folder(tmp_path / "a" / "model", lambda d: (d / "config.json").write_text("{}"))
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert (folder / "config.json").read_text() == "{}"
        assert [p.name for p in folder.parent.iterdir()] == ["model"]  # no temporary folder left
        d, f = temp_dir_beside(tmp_path / "b" / "out"), temp_file_beside(tmp_path / "b" / "out.h5ad", ".h5ad")
        assert d.parent == f.parent == tmp_path / "b" and d.name.startswith(".out.tmp-")
        assert stat.S_IMODE(d.stat().st_mode) == 0o755 and stat.S_IMODE(f.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(temp_dir_beside(tmp_path / "c").stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_publish_dir_replaces_an_existing_folder_whole(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = temp_dir_beside(out)
    (tmp / "new.txt").write_text("new")
    assert publish_dir(tmp, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # nothing of the old folder survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary or trash folder left


def test_write_folder_replaces_only_its_own_kind_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "model"
    write_folder(out, lambda d: (d / "config.json").write_text("1"), marker="config.json")
    write_folder(out, lambda d: (d / "config.json").write_text("2"), marker="config.json")
    assert (out / "config.json").read_text() == "2"
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ScmmError, match="refusing to replace"):
        write_folder(mine, lambda d: (d / "config.json").write_text("x"), marker="config.json")
    assert (mine / "notes.txt").read_text() == "keep me"

    def fail(d):
        (d / "config.json").write_text("3")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        write_folder(out, fail, marker="config.json")
    assert (out / "config.json").read_text() == "2"  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "my_notes"]  # no temporary folder left


LOST_SIGTERM = """
import os, signal, sys
from pathlib import Path
from scmm import cli
from scmm.atomic import write_file, write_folder

class Finalised:
    def __del__(self):  # SIGTERM lands in a finaliser: Python would print "Exception ignored" and carry on
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))

cli._end_on_sigterm()
Finalised()
print("carried on", flush=True)
out = Path(sys.argv[1])
for write in (lambda: write_file(out / "a.txt", lambda p: p.write_text("a")),
              lambda: write_folder(out / "folder", lambda d: (d / "b.txt").write_text("b"))):
    try:
        write()
    except cli.Terminated:
        print("refused", flush=True)
"""


def test_a_sigterm_lost_in_a_finaliser_still_publishes_nothing(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", LOST_SIGTERM, str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # the handler's exception was lost in the finaliser, and Python printed nothing of it
    assert r.stdout.split() == ["carried", "on", "refused", "refused"]
    assert list(tmp_path.iterdir()) == []  # neither the file nor the folder, nor a temporary


@pytest.mark.parametrize("writer,where", [("sink", "shutil.copyfile"), ("sink", "h5py.File"),
                                          ("pseudocells", "h5py.File"), ("pseudocells", "ad.io.write_elem")])
def test_an_interrupt_while_an_output_is_set_up_leaves_no_temporary(tmp_path, monkeypatch, writer, where):
    """Ctrl-C or SIGTERM (its exception) while the output's temporary is being made, before the `with` block holds
    it: the temporary is removed and the exception goes on (seen in CI: SIGTERM during the input's copy)."""
    import functools

    import pandas as pd

    from conftest import make_adata
    from scmm import h5ad_writer
    src = tmp_path / "in" / "cells.h5ad"
    src.parent.mkdir()
    make_adata(n_cells=50).write_h5ad(src)
    out = tmp_path / "out"
    out.mkdir()
    owner, name = where.rsplit(".", 1)
    target = functools.reduce(getattr, owner.split("."), h5ad_writer)
    real = getattr(target, name)

    def interrupted(*args, **kwargs):
        if name == "copyfile":  # half a copy
            Path(args[1]).write_bytes(b"half")
        else:
            real(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(target, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        if writer == "sink":
            h5ad_writer.Sink(src, out / "cells.h5ad", 50, 4)
        else:
            h5ad_writer.PseudocellWriter(out / "gen.h5ad", ["A B cell."], 3,
                                         pd.DataFrame(index=pd.Index(["G1", "G2"], name="gene")), {})
    assert list(out.iterdir()) == []
