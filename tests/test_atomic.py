"""Atomic outputs get the permissions a plain mkdir / open would give, not mkdtemp's private 0700 / 0600."""
from __future__ import annotations

import os
import stat

from scmm.model.cell_tower import atomic_write_folder
from scmm.atomic import temp_dir_beside, temp_file_beside


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = atomic_write_folder(tmp_path / "a" / "model", lambda d: (d / "config.json").write_text("{}"))
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
    from scmm.atomic import publish_dir
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = temp_dir_beside(out)
    (tmp / "new.txt").write_text("new")
    assert publish_dir(tmp, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # nothing of the old folder survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary or trash folder left
