"""Model folders: the one format base (scmm.model.pretrained), older formats still open, self-contained folders,
and a package's files verified before use (issue 25; issue 28 item 2)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from conftest import save_tiny_stage1


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("folders")


@pytest.fixture(scope="module")
def stage1(work: Path, small_corpus: Path) -> Path:
    """A stage-1 folder as the trainer writes it: with the corpus's gene panel and labels."""
    return save_tiny_stage1(small_corpus, work / "run" / "stage1" / "model", corpus_facts=True)


@pytest.fixture(scope="module")
def synth(work: Path) -> Path:
    """A `scmm data synth` file of 300 genes: more than the corpus's 20-gene panel, some of them in it."""
    from scmm.cli import main
    path = work / "synth.h5ad"
    assert main(["data", "synth", "--cells", "40", "--genes", "300", "--out", str(path), "--quiet"]) == 0
    return path


def _embed(model, h5ad: Path) -> np.ndarray:
    from scmm.api import embed
    return embed(ad.read_h5ad(h5ad), model).obsm["X_scmm"]


# --- the registry -----------------------------------------------------------------------------------------
def test_every_folder_kind_names_its_format_from_the_registry(stage1: Path, tmp_path: Path):
    from scmm.model.pretrained import FORMATS
    assert {name: (f.version, f.readable) for name, f in FORMATS.items()} == {
        "scmm-cell-tower": (1, (1, 0)), "scmm-expr-decoder": (1, (1, 0)), "scmm-aligner": (3, (3, 2)),
        "scmm-stage2": (4, (4, 3)), "scmm-model": (3, (3, 2)), "scmm-index": (1, (1,))}
    top = json.loads((stage1 / "config.json").read_text())
    tower = json.loads((stage1 / "cell_tower" / "config.json").read_text())
    assert (top["format"], top["format_version"]) == ("scmm-aligner", 3)
    assert (tower["format"], tower["format_version"]) == ("scmm-cell-tower", 1)
    # each setting once: the tower's config in cell_tower/ only, pad_value in the cell encoding only
    assert "cell_tower" not in top and "pad_value" not in tower and tower["from_parent"] == ["pad_value"]
    assert json.loads((stage1 / "cell_encoding.json").read_text())["pad_value"] == -2.0
    # the folder is self-contained: the training corpus's panel and labels are inside it
    from scmm.data_pipeline.store import Corpus
    corpus = Corpus(json.loads((stage1 / "labels.json").read_text())["corpus"])
    assert json.loads((stage1 / "genes.json").read_text())["vocab_ids"] == [int(i) for i in corpus.gene_vocab_ids]
    # a cell_tower/ taken out of its stage-1 folder says where its pad_value is
    from scmm.errors import ScmmError
    from scmm.model.cell_tower import CellTower
    with pytest.raises(ScmmError, match="pad_value from the model folder around it"):
        CellTower.from_pretrained(stage1 / "cell_tower")
    assert CellTower.from_pretrained(stage1 / "cell_tower", pad_value=-2.0).config.pad_value == -2.0


def test_a_folder_of_another_format_or_version_is_refused(stage1: Path, tmp_path: Path):
    from scmm.errors import ScmmError
    from scmm.model.aligner import CellTextAligner
    from scmm.model.expr_decoder import ExprDecoder
    with pytest.raises(ScmmError, match="not an scmm expression decoder folder .format 'scmm-aligner'"):
        ExprDecoder.from_pretrained(stage1)
    bad = tmp_path / "v9"
    shutil.copytree(stage1, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "format_version": 9}))
    with pytest.raises(ScmmError, match="format scmm-aligner version 9; this scmm reads version 3 or 2"):
        CellTextAligner.from_pretrained(bad)


# --- older folders of the current formats still open ----------------------------------------------------------
def _drop_format_keys(path: Path, **add) -> None:
    cfg = json.loads(path.read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("format", "format_version", "from_parent")}
    path.write_text(json.dumps({**cfg, **add}, indent=2, sort_keys=True))


def test_cell_tower_and_decoder_folders_of_format_0_open(tmp_path: Path):
    """Format 0: config.json without format keys (as written before the registry)."""
    from scmm.model.cell_tower import CellTower, CellTowerConfig
    from scmm.model.expr_decoder import ExprDecoder
    torch.manual_seed(0)
    tower = CellTower(CellTowerConfig(vocab_size=30, pad_token_id=0, d_model=16, nhead=2, d_hid=32, nlayers=1,
                                      dropout=0.0)).eval()
    tower.save_pretrained(tmp_path / "tower")
    _drop_format_keys(tmp_path / "tower" / "config.json")
    decoder = ExprDecoder(16).eval()
    decoder.save_pretrained(tmp_path / "dec")
    _drop_format_keys(tmp_path / "dec" / "config.json")
    ids, values = torch.tensor([[1, 5, 7, 0]]), torch.tensor([[0.0, 1.5, 2.0, -2.0]])
    pad = torch.tensor([[False, False, False, True]])
    old = CellTower.from_pretrained(tmp_path / "tower").eval()
    assert old.config == tower.config
    assert torch.equal(old(ids, values, pad), tower(ids, values, pad))
    hidden = torch.randn(1, 3, 16)
    assert torch.equal(ExprDecoder.from_pretrained(tmp_path / "dec")(hidden), decoder(hidden))


def _as_format_2(stage1: Path, old: Path) -> Path:
    """The stage-1 layout of format 2: the tower's config twice (config.json and cell_tower/, pad_value in both),
    cell_tower/config.json without format keys, no gene panel or labels in the folder."""
    shutil.copytree(stage1, old)
    enc = json.loads((old / "cell_encoding.json").read_text())
    _drop_format_keys(old / "cell_tower" / "config.json", pad_value=enc["pad_value"])
    tower = json.loads((old / "cell_tower" / "config.json").read_text())
    cfg = json.loads((old / "config.json").read_text())
    cfg = {"format": "scmm-aligner", "format_version": 2, "cell_tower": tower,
           **{k: v for k, v in cfg.items() if k not in ("format", "format_version")}}
    (old / "config.json").write_text(json.dumps(cfg, indent=1))
    (old / "genes.json").unlink()
    (old / "labels.json").unlink()
    return old


def test_a_stage1_folder_of_format_2_opens_and_embeds_the_same(stage1: Path, small_corpus: Path, tmp_path: Path):
    from scmm.api import load_model
    old = _as_format_2(stage1, tmp_path / "old")
    new_model, old_model = load_model(stage1), load_model(old)
    a, b = old_model.aligner.config, new_model.aligner.config
    assert (a.cell_tower, a.qformer, a.loss) == (b.cell_tower, b.qformer, b.loss)
    assert old_model.labels is None and old_model.panel_vocab_ids is None  # nothing is looked up outside it
    h5ad = tmp_path / "cells.h5ad"
    from conftest import make_adata
    make_adata(n_cells=24).write_h5ad(h5ad)  # the corpus's 20 genes: the panel keeps them all
    np.testing.assert_array_equal(_embed(old_model, h5ad), _embed(new_model, h5ad))


def test_a_package_of_format_2_opens_and_embeds_the_same(stage1: Path, small_corpus: Path, tmp_path: Path,
                                                         synth: Path):
    from scmm.api import load_model
    from scmm.model.folders import files_of
    from scmm.package import package_model
    pkg = package_model(stage1, small_corpus, tmp_path / "pkg")
    old = tmp_path / "old"
    shutil.copytree(pkg, old)
    _as_format_2(pkg / "stage1", tmp_path / "s1")
    shutil.rmtree(old / "stage1")
    shutil.copytree(tmp_path / "s1", old / "stage1")
    manifest = json.loads((old / "scmm_model.json").read_text())
    del manifest["manifest_sha256"]
    manifest["format_version"] = 2
    manifest["files"] = files_of(old, skip=("scmm_model.json",))
    (old / "scmm_model.json").write_text(json.dumps(manifest, indent=1))
    a, b = load_model(pkg), load_model(old)
    assert a.labels == b.labels and np.array_equal(a.panel_vocab_ids, b.panel_vocab_ids)
    np.testing.assert_array_equal(_embed(a, synth), _embed(b, synth))


# --- self-contained: the same output from anywhere --------------------------------------------------------
def test_embedding_does_not_depend_on_the_working_directory_or_where_the_folder_lies(
        stage1: Path, small_corpus: Path, synth: Path, work: Path, tmp_path: Path, monkeypatch):
    """The bug of issue 25: a bare model's gene panel came from ``../config.json``'s corpus, searched from the
    working directory, so a moved copy read every gene. The panel is in the folder now."""
    from scmm.api import load_model
    run = stage1.parent
    (run / "config.json").write_text(json.dumps({"corpus": str(small_corpus.relative_to(small_corpus.parents[1]))}))
    monkeypatch.chdir(small_corpus.parents[1])  # where the run config's relative corpus path resolves
    here = _embed(load_model(stage1), synth)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert np.array_equal(_embed(load_model(stage1), synth), here)
    moved = tmp_path / "moved" / "model"
    shutil.copytree(stage1, moved)
    assert np.array_equal(_embed(load_model(moved), synth), here)
    monkeypatch.chdir(moved.parent)
    assert np.array_equal(_embed(load_model("model"), synth), here)
    # the panel decides: without it all 300 genes are read and the cells embed elsewhere
    (moved / "genes.json").unlink()
    assert not np.allclose(_embed(load_model(moved), synth), here, atol=1e-4)


# --- a package's files verified before use (issue 28 item 2) -----------------------------------------------
@pytest.fixture(scope="module")
def package(work: Path, stage1: Path, small_corpus: Path) -> Path:
    """A package with every kind of file: JSON, safetensors, text, Markdown and a novelty reference (npz)."""
    from scmm.model.folders import NOVELTY_FILE, sha256_file
    from scmm.package import package_model
    ev = work / "eval"
    ev.mkdir()
    np.savez(ev / NOVELTY_FILE, genes=np.arange(5), points=np.ones((3, 2), dtype=np.float16))
    (ev / "metrics.json").write_text(json.dumps({"annotation": {"calibration": {"novelty_reference": {
        "space": "expression", "sha256": sha256_file(ev / NOVELTY_FILE)}}}}))
    return package_model(stage1, small_corpus, work / "pkg", metrics=ev / "metrics.json")


def _resign(pkg: Path, rel: str) -> None:
    """Record the changed file's checksum in the manifest, as if it had been packaged so."""
    from scmm.model.folders import manifest_digest, sha256_file
    m = json.loads((pkg / "scmm_model.json").read_text())
    m["files"][rel] = sha256_file(pkg / rel)
    m["manifest_sha256"] = manifest_digest(m)
    (pkg / "scmm_model.json").write_text(json.dumps(m, indent=1))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    else:
        path.write_bytes(data[:len(data) // 2])


def _run(pkg: Path, h5ad: Path, out: Path, capsys) -> tuple[int, list[str]]:
    from scmm.cli import main
    capsys.readouterr()
    rc = main(["embed", str(h5ad), "--model", str(pkg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("error")]


def test_every_damaged_file_of_a_package_ends_in_one_error_line(package: Path, synth: Path, tmp_path: Path,
                                                                capsys):
    """Flip a byte in each file of a package, or truncate it: one `error:` line, exit 2, nothing written."""
    rels = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())
    assert {"scmm_model.json", "novelty_reference.npz", "README.md", "stage1/aligner.safetensors",
            "stage1/cell_tower/vocab.json", "stage1/text_tower/tokenizer.json"} <= set(rels)
    work = tmp_path / "pkg"
    shutil.copytree(package, work)
    for rel in rels:
        for how in ("flip", "truncate"):
            original = (work / rel).read_bytes()
            _damage(work / rel, how)
            rc, err = _run(work, synth, tmp_path / "out.h5ad", capsys)
            assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rel, how, err)
            assert rel.split("/")[-1] in err[0], (rel, how, err)
            assert not (tmp_path / "out.h5ad").exists()
            (work / rel).write_bytes(original)
    rc, err = _run(work, synth, tmp_path / "out.h5ad", capsys)
    assert rc == 0, err


def test_a_file_that_passes_its_checksum_but_does_not_decode_is_named(package: Path, synth: Path,
                                                                      tmp_path: Path, capsys):
    """Issue 28, case 2: the damaged file's checksum recorded in the manifest; the readers name the file."""
    rels = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()
                  and p.name != "scmm_model.json")
    decoded = (".json", ".safetensors", ".npz")
    for rel in rels:
        for how in ("flip", "truncate"):
            work = tmp_path / f"pkg-{how}"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(package, work)
            _damage(work / rel, how)
            _resign(work, rel)
            rc, err = _run(work, synth, tmp_path / "out.h5ad", capsys)
            if rc == 0:  # a file the command does not read (README.md), or a change that still decodes
                assert not (how == "truncate" and rel.endswith(decoded)), (rel, how)
                (tmp_path / "out.h5ad").unlink()
                continue
            assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rel, how, err)
            if how == "truncate" and rel.endswith(decoded):
                assert rel.split("/")[-1] in err[0], (rel, err)


def test_a_file_the_manifest_does_not_list_is_refused(package: Path, synth: Path, tmp_path: Path, capsys):
    work = tmp_path / "pkg"
    shutil.copytree(package, work)
    (work / "stage1" / "text_tower" / "extra.json").write_text("{}")
    rc, err = _run(work, synth, tmp_path / "out.h5ad", capsys)
    assert rc == 2 and err == [f"error: model {work} holds 1 file(s) its manifest does not list (refused): "
                               "stage1/text_tower/extra.json"]


def test_a_damaged_package_through_the_command_line_prints_no_traceback(package: Path, synth: Path,
                                                                        tmp_path: Path):
    work = tmp_path / "pkg"
    shutil.copytree(package, work)
    _damage(work / "stage1" / "aligner.safetensors", "truncate")
    _resign(work, "stage1/aligner.safetensors")
    r = subprocess.run([sys.executable, "-m", "scmm.cli", "embed", str(synth), "--model", str(work), "--out",
                        str(tmp_path / "o.h5ad")], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("error: ") and "aligner.safetensors" in lines[-1], r.stderr
