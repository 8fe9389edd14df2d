"""Inference: `scmm embed | annotate | describe | index build | index query | package` and scmm.api.

A tiny untrained stage-1 model is trained on nothing: it is built on a corpus made from a subset of the real
PBMC demo data (scanpy's pbmc68k_reduced), packaged, and run on that subset and on a synthetic h5ad
(`scmm data synth`). What is checked is the plumbing: fields, chunk invariance, atomic outputs, the input
left untouched, errors.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import run_cli, save_tiny_stage1

OBS_FIELDS = ("scmm_cell_type", "scmm_cell_type_ontology_term_id", "scmm_confidence")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference")


@pytest.fixture(scope="module")
def pbmc_h5ad(work: Path) -> Path:
    """175 real PBMCs (every 4th cell of pbmc68k_reduced, raw counts in X)."""
    from scmm.data_pipeline.demo_data import pbmc_demo_adata
    adata = pbmc_demo_adata()[::4].copy()
    path = work / "pbmc.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def corpus(work: Path, pbmc_h5ad: Path) -> Path:
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    build_corpus(BuildConfig(inputs=[pbmc_h5ad], out=work / "corpus", shard_size=64, progress=False))
    return work / "corpus"


@pytest.fixture(scope="module")
def stage1(work: Path, corpus: Path) -> Path:
    return save_tiny_stage1(corpus, work / "stage1" / "model")


@pytest.fixture(scope="module")
def package(work: Path, stage1: Path, corpus: Path) -> Path:
    metrics = work / "metrics.json"
    metrics.write_text(json.dumps({"annotation": {"accuracy": 0.5, "macro_f1": 0.4, "ontology_score": 0.6,
                                                  "n_cells": 16, "n_classes": 9},
                                   "baselines": {"majority": {"accuracy": 0.3, "macro_f1": 0.05}}}))
    from scmm.cli import main
    assert main(["package", "--stage1", str(stage1), "--corpus", str(corpus), "--metrics", str(metrics),
                 "--out", str(work / "pkg")]) == 0
    return work / "pkg"


@pytest.fixture(scope="module")
def model(package: Path):
    from scmm.api import load_model
    return load_model(package)


@pytest.fixture(scope="module")
def synth_h5ad(work: Path) -> Path:
    path = work / "synth.h5ad"
    r = run_cli("data", "synth", "--cells", "150", "--genes", "300", "--out", str(path), "--quiet")
    assert r.returncode == 0, r.stderr
    return path


def _cli(*args: str) -> int:
    from scmm.cli import main
    return main(list(args))


# --- package ----------------------------------------------------------------------------------------
def test_package_layout_and_round_trip(package: Path, model, stage1: Path, corpus: Path):
    manifest = json.loads((package / "scmm_model.json").read_text())
    assert manifest["format"] == "scmm-model" and manifest["format_version"] == 3
    assert manifest["components"] == ["stage1", "metrics"]
    for rel, digest in manifest["files"].items():
        assert _sha(package / rel) == digest
    assert (package / "stage1" / "cell_encoding.json").is_file() and (package / "README.md").is_file()
    card = (package / "README.md").read_text()
    assert "scmm annotate" in card and "| method | accuracy | macro-F1 |" in card and "B cell" in card
    labels = json.loads((package / "labels.json").read_text())["labels"]
    cm = json.loads((corpus / "manifest.json").read_text())["cell_types"]
    assert {r["key"] for r in labels} == set(cm)
    assert all(r["count"] == cm[r["key"]]["count"] and r["texts"] for r in labels)
    assert model.packaged and not model.has_stage2 and model.metrics["annotation"]["accuracy"] == 0.5
    # the bare stage-1 folder gives the same embedding space (same fingerprint)
    from scmm.api import load_model
    assert load_model(stage1).fingerprint == model.fingerprint


def test_package_corrupted_file_and_wrong_version(package: Path, tmp_path: Path):
    import shutil

    from scmm.api import load_model
    from scmm.errors import ScmmError
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    weights = bad / "stage1" / "aligner.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ScmmError, match="checksum mismatch in stage1/aligner.safetensors"):
        load_model(bad)
    weights.unlink()
    with pytest.raises(ScmmError, match="stage1/aligner.safetensors is missing"):
        load_model(bad)
    old = tmp_path / "old"
    shutil.copytree(package, old)
    m = json.loads((old / "scmm_model.json").read_text())
    m["format_version"] = 99
    (old / "scmm_model.json").write_text(json.dumps(m))
    with pytest.raises(ScmmError, match="format scmm-model version 99"):
        load_model(old)


# --- embed / annotate -------------------------------------------------------------------------------
def test_embed_cli_writes_copy_plus_embedding(package: Path, pbmc_h5ad: Path, work: Path):
    before = _sha(pbmc_h5ad)
    out = work / "embedded.h5ad"
    r = run_cli("embed", str(pbmc_h5ad), "--model", str(package), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "genes map to the model's vocabulary" in r.stderr  # coverage reported before the work
    assert _sha(pbmc_h5ad) == before
    src, res = ad.read_h5ad(pbmc_h5ad), ad.read_h5ad(out)
    emb = res.obsm["X_scmm"]
    assert emb.shape == (src.n_obs, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (res.X != src.X).nnz == 0 and list(res.obs_names) == list(src.obs_names)
    pd.testing.assert_frame_equal(res.obs.drop(columns="scmm_qc"), src.obs)  # the input's obs, plus the QC flag
    assert set(res.obs["scmm_qc"]) == {"ok"}
    assert not [p for p in work.iterdir() if p.name.startswith(".embedded")]


def test_embedding_matches_the_training_pipeline(model, corpus: Path):
    """The reader + collate path gives the embeddings the corpus loader gives for the same cells."""
    from scmm.api import embed
    from scmm.data_pipeline.demo_data import pbmc_demo_adata
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.annotate import embed_split
    c = Corpus(corpus)
    ref = embed_split(model.aligner, c, "test", progress=False)
    adata = pbmc_demo_adata()[::4].copy()
    out = embed(adata[ref.cell_ids].copy(), model, precision="fp32")
    np.testing.assert_allclose(out.obsm["X_scmm"], ref.embeddings, atol=1e-5)
    # the bf16 fast path (the default where bf16 is native) stays close to it, at unit length
    fast = embed(adata[ref.cell_ids].copy(), model, precision="bf16").obsm["X_scmm"]
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert (fast * ref.embeddings).sum(1).min() > 0.999


def test_chunked_equals_one_chunk(model, pbmc_h5ad: Path, synth_h5ad: Path):
    from scmm.api import annotate
    for path in (pbmc_h5ad, synth_h5ad):  # exact in fp32
        whole = annotate(str(path), model, chunk_size=100_000, batch_size=64, precision="fp32")
        chunked = annotate(str(path), model, chunk_size=7, batch_size=3, precision="fp32")
        np.testing.assert_allclose(chunked.obsm["X_scmm"], whole.obsm["X_scmm"], atol=1e-6)
        for col in OBS_FIELDS[:2]:
            assert list(chunked.obs[col]) == list(whole.obs[col])
        np.testing.assert_allclose(chunked.obs["scmm_confidence"], whole.obs["scmm_confidence"], atol=1e-5)
    # in bf16 the rounding follows the batches' shapes: close, not bit-identical
    a = annotate(str(pbmc_h5ad), model, chunk_size=100_000, precision="bf16").obsm["X_scmm"]
    b = annotate(str(pbmc_h5ad), model, chunk_size=7, batch_size=3, precision="bf16").obsm["X_scmm"]
    assert (a * b).sum(1).min() > 0.999


def test_file_output_is_written_chunk_by_chunk_and_equals_the_in_memory_result(model, pbmc_h5ad: Path,
                                                                                tmp_path: Path, monkeypatch):
    """--out streams: obsm['X_scmm'] filled per chunk, new obs columns added to the copy's obs without reading
    the input's obs table; the file equals the in-memory result (and re-annotating an output replaces columns)."""
    from scmm.api import annotate, embed
    from scmm.data_pipeline import h5ad as h5ad_mod
    memory = annotate(str(pbmc_h5ad), model, chunk_size=100, precision="fp32")
    monkeypatch.setattr(h5ad_mod.H5adSource, "obs", property(lambda self: pytest.fail("obs was read")))
    out = annotate(str(pbmc_h5ad), model, chunk_size=100, out=tmp_path / "a.h5ad", precision="fp32")
    again = annotate(str(out), model, chunk_size=33, out=tmp_path / "b.h5ad", precision="fp32")
    monkeypatch.undo()
    for path in (out, again):
        written = ad.read_h5ad(path)
        assert list(written.obs.columns) == list(memory.obs.columns)
        pd.testing.assert_frame_equal(written.obs, memory.obs)
        np.testing.assert_allclose(written.obsm["X_scmm"], memory.obsm["X_scmm"], atol=1e-6)
        assert (written.X != memory.X).nnz == 0
    only = ad.read_h5ad(embed(str(pbmc_h5ad), model, chunk_size=64, out=tmp_path / "e.h5ad", precision="fp32"))
    np.testing.assert_allclose(only.obsm["X_scmm"], memory.obsm["X_scmm"], atol=1e-6)
    assert list(only.obs["scmm_qc"]) == list(memory.obs["scmm_qc"])


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(package: Path, pbmc_h5ad: Path, tmp_path: Path):
    """`torchrun --nproc_per_node 2 scmm annotate`: the ranks split the cells, rank 0 merges their parts into one
    output equal to the one-process output; no part file is left behind."""
    import os
    import subprocess
    import sys
    args = ["annotate", str(pbmc_h5ad), "--model", str(package), "--precision", "fp32", "--chunk-size", "150",
            "--quiet"]
    assert _cli(*args, "--out", str(tmp_path / "one.h5ad")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "scmm.cli", *args, "--out", str(tmp_path / "two.h5ad")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = ad.read_h5ad(tmp_path / "one.h5ad"), ad.read_h5ad(tmp_path / "two.h5ad")
    pd.testing.assert_frame_equal(two.obs.drop(columns="scmm_confidence"), one.obs.drop(columns="scmm_confidence"))
    np.testing.assert_allclose(two.obs["scmm_confidence"], one.obs["scmm_confidence"], atol=1e-6)
    np.testing.assert_allclose(two.obsm["X_scmm"], one.obsm["X_scmm"], atol=1e-6)
    assert (two.X != one.X).nnz == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5ad", "two.h5ad"]
    # a rank that fails: every rank exits 2, rank 0 alone prints the failing rank's error, once; nothing is
    # written, no part is left behind
    faulty = tmp_path / "faulty.py"
    faulty.write_text("import os, sys\nimport scmm.ranks as ranks\nfrom scmm.errors import ScmmError\n"
                      "def boom(*a, **k):\n    raise ScmmError('injected failure')\n"
                      "if os.environ['RANK'] == '1':\n    ranks.fill_rows = boom\n"
                      "from scmm.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(faulty), *args, "--out", str(tmp_path / "three.h5ad")],
                       capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and errors == ["error: injected failure (on rank 1 of 2; no output was written)"], \
        r.stderr[-4000:]
    assert_ranks_exit_2(r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faulty.py", "one.h5ad", "two.h5ad"]


def assert_ranks_exit_2(stderr: str) -> None:
    """torchrun's failure report of 2 ranks: the first rank to fail (the root cause) exited 2; the other exited 2
    too, or was still running when the launcher stopped it (SIGTERM, -15: which rank ends first is a race); no
    rank printed a traceback (the only frames are the launcher's own)."""
    codes = re.findall(r"exitcode\s+:\s+(-?\d+)", stderr)
    assert len(codes) == 2 and set(codes) <= {"2", "-15"}, stderr[-4000:]
    assert re.search(r"exitcode\s+:\s+2\b", stderr.split("Root Cause", 1)[1]), stderr[-4000:]
    frames = re.findall(r'File "([^"]+)"', stderr)
    assert frames and all("site-packages" in f or f.startswith("<frozen") for f in frames), stderr[-4000:]


def test_api_returns_new_anndata_and_leaves_input_alone(model, pbmc_h5ad: Path):
    from scmm.api import annotate
    adata = ad.read_h5ad(pbmc_h5ad)
    snapshot = adata.copy()
    out = annotate(adata, model, labels=["CL:0000236", "T cell", "something never seen"], unknown_threshold=0.0)
    assert out is not adata and "X_scmm" not in adata.obsm and "scmm_cell_type" not in adata.obs
    assert (adata.X != snapshot.X).nnz == 0
    assert set(out.obs["scmm_cell_type"]) <= {"B cell", "T cell", "something never seen"}
    ids = dict(zip(out.obs["scmm_cell_type"], out.obs["scmm_cell_type_ontology_term_id"]))
    assert ids.get("B cell", "CL:0000236") == "CL:0000236" and ids.get("something never seen", "") == ""
    everything_unknown = annotate(adata, model, unknown_threshold=1.0)
    assert set(everything_unknown.obs["scmm_cell_type"]) == {"unknown"}


def test_annotate_cli_default_labels_smooth_and_unknown(package: Path, pbmc_h5ad: Path, work: Path):
    before = _sha(pbmc_h5ad)
    out = work / "annotated.h5ad"
    assert _cli("annotate", str(pbmc_h5ad), "--model", str(package), "--out", str(out), "--smooth",
                "--chunk-size", "50", "--batch-size", "16", "--quiet") == 0
    assert _sha(pbmc_h5ad) == before
    res = ad.read_h5ad(out)
    labels = json.loads((package / "labels.json").read_text())["labels"]
    assert set(res.obs["scmm_cell_type_ontology_term_id"]) <= {r["key"] for r in labels}
    conf = res.obs["scmm_confidence"].to_numpy()
    assert conf.dtype == np.float32 and ((conf > 0) & (conf <= 1.0 + 1e-6)).all()
    assert res.obsm["X_scmm"].shape == (res.n_obs, 16)
    assert _cli("annotate", str(pbmc_h5ad), "--model", str(package), "--out", str(out), "--overwrite",
                "--unknown-threshold", "1", "--quiet") == 0
    assert set(ad.read_h5ad(out).obs["scmm_cell_type"]) == {"unknown"}


# --- describe ---------------------------------------------------------------------------------------
def test_describe_without_stage2_is_an_error(package: Path, pbmc_h5ad: Path, work: Path):
    out = work / "described.h5ad"
    r = run_cli("describe", str(pbmc_h5ad), "--model", str(package), "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "stage-2" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_describe_calls_the_stage2_model(stage1: Path, corpus: Path, pbmc_h5ad: Path, tmp_path: Path,
                                         monkeypatch):
    """With a stand-in for the stage-2 model: descriptions land in obs in the input's row order."""
    seen = {}

    class FakeStage2:
        @classmethod
        def from_pretrained(cls, folder, aligner=None, stage1_folder=None):
            seen["folder"], seen["aligner"] = Path(folder), aligner
            return cls()

        def to(self, device):
            return self

        def describe_cells(self, batch, task="describe", constrained=False, num_beams=1):
            assert task == "describe" and set(batch) >= {"gene_ids", "values", "padding_mask"}
            n_genes = (~batch["padding_mask"]).sum(1) - 1
            return [f"a cell expressing {int(n)} genes." + (CLAIM if n % 2 else "") for n in n_genes]

    import shutil

    import scmm.model.folders as folders
    monkeypatch.setattr(folders, "Stage2Model", FakeStage2)
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    (stage2 / "config.json").write_text(json.dumps({"format": "scmm-stage2"}))
    shutil.copytree(stage1, stage2 / "stage1")
    from scmm.package import package_model
    pkg = package_model(stage1, corpus, tmp_path / "pkg2", stage2=stage2)
    assert not (pkg / "stage2" / "stage1").exists()  # the stage-1 model is stored once
    out = tmp_path / "d.h5ad"
    assert _cli("describe", str(pbmc_h5ad), "--model", str(pkg), "--out", str(out), "--chunk-size", "33",
                "--quiet") == 0
    assert seen["folder"] == pkg / "stage2" and seen["aligner"] is not None  # the package's stage 1, loaded once
    res = ad.read_h5ad(out)
    x = ad.read_h5ad(pbmc_h5ad)
    from scmm.api import load_model
    panel = set(load_model(pkg).panel_vocab_ids.tolist())
    vocab = json.loads((corpus / "vocab.json").read_text())
    expressed = [sum(1 for g in np.asarray(x.var["feature_name"])[row.indices] if vocab.get(str(g)) in panel)
                 for row in sp.csr_matrix(x.X)]
    assert list(res.obs["scmm_description"]) == [f"a cell expressing {n} genes." + (CLAIM if n % 2 else "")
                                                 for n in expressed]
    # each cell's measured programs and markers are the corpus's facts of that cell, and the claims are checked
    # against them: CLAIM names hypoxia and MS4A1 (half a point each when among the top 3 / top 20)
    from scmm.data_pipeline.fact_text import PROGRAM_PHRASES
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.language import split_facts
    facts = {}
    for split in ("train", "val", "test"):
        f = split_facts(Corpus(corpus), split)
        facts.update(zip(f.cell_ids, zip(f.top_programs(), f.marker_symbols(20))))
    cells = [facts[c] for c in res.obs_names]
    assert list(res.obs["scmm_programs"]) == [", ".join(PROGRAM_PHRASES[p] for p in top) for top, _ in cells]
    assert list(res.obs["scmm_markers"]) == [", ".join(markers[:5]) for _, markers in cells]
    expected = [(("HALLMARK_HYPOXIA" in top) + ("MS4A1" in markers)) / 2 if n % 2 else np.nan
                for (top, markers), n in zip(cells, expressed)]
    np.testing.assert_array_equal(res.obs["scmm_claims_supported"].to_numpy(), np.float32(expected))
    assert 0 < np.nanmean(expected) < 1  # both outcomes occur
    from scmm.api import describe  # in memory: the same texts and facts
    mem = describe(str(pbmc_h5ad), pkg, chunk_size=50).obs
    cols = ["scmm_description", "scmm_programs", "scmm_markers", "scmm_claims_supported"]
    pd.testing.assert_frame_equal(mem[cols].reset_index(drop=True), res.obs[cols].reset_index(drop=True),
                                  check_categorical=False)


CLAIM = " Its most active programs are hypoxia; it expresses high levels of MS4A1 (membrane spanning 4-domains A1)."


def test_claims_supported_by_hand():
    from scmm.cell_facts import CellFacts, claims_supported
    cells = CellFacts(programs=[["HALLMARK_HYPOXIA", "HALLMARK_APOPTOSIS", "HALLMARK_GLYCOLYSIS"]] * 3,
                      markers=[["MS4A1", "CD79A", "CD74"]] * 3)
    texts = ["A B cell. It shows high activity of hypoxia and complement; among its most over-expressed genes are "
             "MS4A1 (membrane spanning 4-domains A1), CD3E (CD3 epsilon subunit of T-cell receptor complex) and "
             "CD74 (CD74 molecule).",  # 1 of 2 programs, 2 of 3 genes
             "A B cell from the blood.",  # no claim
             "Its most active programs are apoptosis and glycolysis."]  # 2 of 2
    np.testing.assert_array_equal(claims_supported(texts, cells), np.float32([3 / 5, np.nan, 1.0]))


def test_the_package_keeps_the_corpus_fact_reference(package: Path, corpus: Path):
    """facts.json holds the corpus's fact statistics byte for byte (float64 through JSON); it is not part of the
    fingerprint; a damaged one is an error naming it."""
    from scmm.data_pipeline.store import Corpus
    from scmm.model.pretrained import read_fact_model
    model = read_fact_model(package)
    ref = Corpus(corpus)
    assert model.program_names == ref.facts["programs"]["names"] and list(model.symbols) == list(ref.gene_symbols)
    for key, value in model.arrays().items():
        np.testing.assert_array_equal(value, ref.fact_arrays()[key], err_msg=key)
    damaged = package.parent / "damaged_facts"
    damaged.mkdir(exist_ok=True)
    (damaged / "facts.json").write_text((package / "facts.json").read_text().replace('"arrays"', '"arrayz"'))
    from scmm.errors import ScmmError
    with pytest.raises(ScmmError, match="fact reference .*facts.json is unreadable"):
        read_fact_model(damaged)


# --- index ------------------------------------------------------------------------------------------
def test_index_round_trip(package: Path, pbmc_h5ad: Path, work: Path):
    before = _sha(pbmc_h5ad)
    index = work / "ref_index"
    r = run_cli("index", "build", str(pbmc_h5ad), "--model", str(package), "--label-column",
                "cell_type_ontology_term_id", "--out", str(index), "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads((index / "index.json").read_text())
    assert meta["kind"] == "flat" and meta["n"] == 175 and meta["model_fingerprint"]
    out = work / "queried.h5ad"
    assert _cli("index", "query", str(index), str(pbmc_h5ad), "--model", str(package), "--out", str(out),
                "--k", "1", "--quiet") == 0
    assert _sha(pbmc_h5ad) == before
    res = ad.read_h5ad(out)
    assert list(res.obs["scmm_cell_type_ontology_term_id"].astype(str)) == \
        list(res.obs["cell_type_ontology_term_id"].astype(str))
    assert list(res.obs["scmm_cell_type"].astype(str)) == list(res.obs["cell_type"].astype(str))
    assert (res.obs["scmm_confidence"] == 1.0).all()
    # k-NN vote with a larger k: confidences are vote shares
    from scmm.api import query_index
    q = query_index(index, str(pbmc_h5ad), str(package), k=5)
    assert set(np.round(q.obs["scmm_confidence"] * 5, 4)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_index_model_mismatch_and_ivf(package: Path, pbmc_h5ad: Path, work: Path, tmp_path: Path, monkeypatch):
    import scmm.eval.knn as knn
    from scmm.api import build_index, load_model, query_index
    index = work / "ref_index"
    if not index.exists():
        pytest.skip("needs test_index_round_trip's index")
    meta = json.loads((index / "index.json").read_text())
    meta["model_fingerprint"] = "0" * 64
    other = tmp_path / "other_index"
    import shutil
    shutil.copytree(index, other)
    (other / "index.json").write_text(json.dumps(meta))
    r = run_cli("index", "query", str(other), str(pbmc_h5ad), "--model", str(package), "--out",
                str(tmp_path / "q.h5ad"))
    assert r.returncode == 2 and "another model" in r.stderr and not (tmp_path / "q.h5ad").exists()
    # above the size threshold the index is IVF; the vote still finds a cell's own label
    monkeypatch.setattr(knn, "FLAT_MAX_CELLS", 10)
    model = load_model(package)
    build_index(str(pbmc_h5ad), model, "cell_type", tmp_path / "ivf")
    assert json.loads((tmp_path / "ivf" / "index.json").read_text())["kind"] == "ivf_flat"
    q = query_index(tmp_path / "ivf", str(pbmc_h5ad), model, k=1)
    assert (q.obs["scmm_cell_type"].astype(str) == q.obs["cell_type"].astype(str)).mean() > 0.95


# --- bad input --------------------------------------------------------------------------------------
def _assert_clean_error(r, out: Path, needle: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], r.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_error_line(package: Path, pbmc_h5ad: Path, tmp_path: Path):
    out = tmp_path / "out.h5ad"
    r = run_cli("annotate", str(tmp_path / "missing.h5ad"), "--model", str(package), "--out", str(out))
    _assert_clean_error(r, out, "input file not found")
    # no gene overlap
    x = ad.AnnData(X=sp.csr_matrix(np.ones((5, 4), dtype=np.float32)),
                   var=pd.DataFrame(index=[f"NOT_A_GENE_{i}" for i in range(4)]))
    x.obs_names = [f"c{i}" for i in range(5)]
    nogene = tmp_path / "nogene.h5ad"
    x.write_h5ad(nogene)
    r = run_cli("embed", str(nogene), "--model", str(package), "--out", str(out))
    _assert_clean_error(r, out, "map to the gene vocabulary")
    # unknown label column
    idx = tmp_path / "idx"
    r = run_cli("index", "build", str(pbmc_h5ad), "--model", str(package), "--label-column", "no_such_column",
                "--out", str(idx))
    _assert_clean_error(r, idx, "label column 'no_such_column'")
    # missing model
    r = run_cli("embed", str(pbmc_h5ad), "--model", str(tmp_path / "nomodel"), "--out", str(out))
    _assert_clean_error(r, out, "model folder not found")


def test_output_rules(package: Path, pbmc_h5ad: Path, work: Path, tmp_path: Path):
    from scmm.api import embed
    from scmm.errors import ScmmError
    with pytest.raises(ScmmError, match="never modifies its input"):
        embed(pbmc_h5ad, package, out=pbmc_h5ad, overwrite=True)
    out = tmp_path / "o.h5ad"
    out.write_text("x")
    with pytest.raises(ScmmError, match="already exists"):
        embed(pbmc_h5ad, package, out=out)
    assert out.read_text() == "x"
    with pytest.raises(ScmmError, match="must name a .h5ad file"):
        embed(pbmc_h5ad, package, out=tmp_path / "o.csv")
    with pytest.raises(TypeError, match="batchsize"):
        embed(pbmc_h5ad, package, batchsize=3)
    # an in-memory AnnData with out= is written too, atomically
    written = embed(ad.read_h5ad(pbmc_h5ad), package, out=tmp_path / "mem.h5ad")
    assert written == tmp_path / "mem.h5ad" and ad.read_h5ad(written).obsm["X_scmm"].shape[0] == 175


def test_log_normalised_input_is_detected(model, pbmc_h5ad: Path):
    """log1p CP10k values as input give the same embedding as the counts they came from."""
    from scmm.api import embed
    counts = ad.read_h5ad(pbmc_h5ad)
    panel = set(model.panel_vocab_ids.tolist())
    keep = np.array([model.vocab.token_to_id.get(str(g), -1) in panel for g in counts.var["feature_name"]])
    counts = counts[:, keep].copy()
    logn = counts.copy()
    x = sp.csr_matrix(logn.X, dtype=np.float64)
    x = sp.diags(1e4 / np.asarray(x.sum(1)).ravel()) @ x
    x.data = np.log1p(x.data)
    logn.X = sp.csr_matrix(x, dtype=np.float32)
    a = embed(counts, model, precision="fp32").obsm["X_scmm"]
    b = embed(logn, model, precision="fp32").obsm["X_scmm"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cells_with_no_expressed_gene_are_flagged_and_called_unknown(model, pbmc_h5ad: Path):
    from scmm.api import annotate, embed
    adata = ad.read_h5ad(pbmc_h5ad)[:12].copy()
    x = adata.X.toarray()
    x[[2, 7]] = 0.0  # two empty cells
    x[5, :] = 0.0
    x[5, 0] = 3.0  # one cell expressing a single gene: a real, if thin, input
    adata.X = sp.csr_matrix(x)
    out = annotate(adata, model, labels=["B cell", "T cell"], precision="fp32")
    qc = out.obs["scmm_qc"].astype(str).to_numpy()
    assert list(np.flatnonzero(qc == "no_expressed_gene")) == [2, 7]
    assert set(qc) == {"ok", "no_expressed_gene"}
    assert list(out.obs["scmm_cell_type"].astype(str)[[2, 7]]) == ["unknown", "unknown"]
    assert out.obs["scmm_confidence"].to_numpy()[[2, 7]].tolist() == [0.0, 0.0]
    assert (out.obs["scmm_confidence"].to_numpy()[qc == "ok"] > 0).all()
    assert np.isfinite(out.obsm["X_scmm"]).all()
    assert list(embed(adata, model).obs["scmm_qc"].astype(str)) == list(qc)


def test_non_integer_values_of_no_known_scale(model, pbmc_h5ad: Path):
    """Ambient-corrected counts (not integers, no per-cell scaling of counts) far above any log value can only be
    linear: read as such, the same embedding as saying ``input_scale="normalized"``; scaled into a log's range,
    nothing tells them apart and the error names --input-scale."""
    from scmm.api import embed
    from scmm.errors import ScmmError
    adata = ad.read_h5ad(pbmc_h5ad)[:20].copy()
    x = adata.X.toarray()
    adata.X = sp.csr_matrix(np.where(x > 0, x - np.random.default_rng(0).uniform(0, 0.9, x.shape), 0.0))
    assert adata.X.max() > 30
    np.testing.assert_array_equal(embed(adata, model, precision="fp32").obsm["X_scmm"],
                                  embed(adata, model, precision="fp32", input_scale="normalized").obsm["X_scmm"])
    low = adata.copy()
    low.X = adata.X / adata.X.max() * 15.0
    with pytest.raises(ScmmError, match="--input-scale"):
        embed(low, model)
    # counts scaled by one factor are a linear normalisation: read as such, the same input as the counts
    scaled = adata.copy()
    scaled.X = sp.csr_matrix(x * 0.93)
    counts = adata.copy()
    counts.X = sp.csr_matrix(x)
    np.testing.assert_allclose(embed(scaled, model, precision="fp32").obsm["X_scmm"],
                               embed(counts, model, precision="fp32").obsm["X_scmm"], atol=1e-5)


# --- memory set by the chunk, signals, torchrun bad input ---------------------------------------------------
def _tiled(pbmc_h5ad: Path, n: int, path: Path) -> Path:
    """``n`` cells: the 175 PBMCs repeated (unique cell IDs), raw counts; written once."""
    if not path.exists():
        src = ad.read_h5ad(pbmc_h5ad)
        reps = -(-n // src.n_obs)
        big = ad.concat([src] * reps, index_unique="-")[:n].copy()
        big.obs_names = [f"cell{i}" for i in range(n)]
        big.write_h5ad(path)
    return path


def _peaks_mib(*args: str) -> tuple[float, float]:
    """(peak RSS, peak of what Python and numpy allocated) in MiB of ``scmm ARGS`` run in a fresh process: its
    VmHWM, and tracemalloc's peak from after the imports (numpy reports its buffers to tracemalloc, so an array
    or a Python object held per cell counts here byte for byte; the allocator's and the kernels' caches do not)."""
    import os
    import subprocess
    import sys
    code = ("import resource, sys, tracemalloc\nimport anndata, torch\nfrom scmm.cli import main\n"
            "tracemalloc.start()\nrc = main(sys.argv[1:])\n"
            "sys.stderr.write(f'PEAKS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024} "
            "{tracemalloc.get_traced_memory()[1]}\\n')\nsys.exit(rc)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rss, traced = r.stderr.rsplit("PEAKS ", 1)[1].split()[:2]
    return int(rss) / 2**20, int(traced) / 2**20


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("command", ["embed", "annotate"])
def test_peak_memory_is_set_by_the_chunk_not_the_file(command: str, stage1: Path, pbmc_h5ad: Path, corpus: Path,
                                                      work: Path, tmp_path: Path):
    """6x the cells, the same chunk, a model with 256-d embeddings (1 KiB per cell, as the demo's): what Python and
    numpy hold grows by less than 256 bytes per added cell, so no embedding row, input obs row or description is
    held per cell (what is held: the QC flag and the compact label columns, 1 + 4 bytes per column), and the peak
    RSS grows by less than 10 % (the bf16 kernels of each new shape are cached, bounded: BENCHMARKS.md, "Inference
    memory: what grew with the cells"; the RSS itself is too noisy for a per-cell bound: 604 and 3,444 bytes per
    added cell in two runs of the suite at 15k -> 60k cells). Measured at 8k -> 32k cells (chunk 2,000): -1 and
    +17 bytes per added cell held for embed and annotate, peak RSS 1,152 -> 1,159 and 1,191 -> 1,198 MiB; with
    every embedding row kept (a list in ``fill_rows``, on purpose), 650 and 671 bytes per added cell here (the
    Python peak of the small run is set before its embeddings pile up)."""
    from scmm.cli import main
    pkg = work / "pkg256"
    if not pkg.exists():
        wide = save_tiny_stage1(corpus, work / "stage1_256" / "model", embed_dim=256)
        assert main(["package", "--stage1", str(wide), "--corpus", str(corpus), "--out", str(pkg)]) == 0
    sizes = (3_000, 15_000)  # 12k added cells: a row of 256 bytes held per cell would add 3 MiB
    rss, traced = [], []
    for n in sizes:
        data = _tiled(pbmc_h5ad, n, work / f"tiled_{n}.h5ad")
        out = tmp_path / f"{command}_{n}.h5ad"
        peak_rss, peak_traced = _peaks_mib(command, str(data), "--model", str(pkg), "--out", str(out),
                                           "--chunk-size", "1000", "--quiet")
        rss.append(peak_rss)
        traced.append(peak_traced)
        out.unlink()
    held = (traced[1] - traced[0]) * 2**20 / (sizes[1] - sizes[0])
    assert held < 256, f"Python/numpy peak {traced} MiB at {sizes} cells: {held:.0f} bytes per added cell"
    assert rss[1] < 1.1 * rss[0], f"peak RSS {rss} MiB at {sizes} cells"


@pytest.mark.parametrize("command", ["embed", "annotate", "data build"])
def test_sigterm_removes_the_temporary_and_exits_143(command: str, package: Path, pbmc_h5ad: Path, work: Path,
                                                      tmp_path: Path):
    """SIGTERM while the output is being written: the temporary is removed, one line says so, exit 143; an
    existing output is left as it was."""
    from terminate import assert_terminated_cleanly, terminate_while_writing
    data = _tiled(pbmc_h5ad, 20_000, work / "tiled_20000.h5ad")
    if command == "data build":
        out = tmp_path / "corpus"
        args = ["data", "build", str(data), "--out", str(out), "--chunk-size", "500", "--quiet"]
        expected: list[str] = []
    else:
        out = tmp_path / "out.h5ad"
        out.write_bytes(b"an earlier output")
        args = [command, str(data), "--model", str(package), "--out", str(out), "--overwrite", "--chunk-size",
                "1000", "--quiet"]
        expected = ["out.h5ad"]
    result = terminate_while_writing(args, out)
    assert_terminated_cleanly(result, tmp_path, expected)
    if expected:
        assert out.read_bytes() == b"an earlier output"


@pytest.mark.slow
def test_torchrun_bad_input_is_one_error_line_and_exit_2_on_every_rank(package: Path, tmp_path: Path):
    """Under torchrun, bad input is printed once (rank 0) and every rank exits 2 (the launcher's summary lists
    each failed rank's exit code); the launcher's own ChildFailedError report and exit status 1 follow. A rank
    still checking the input when the first one exits is stopped by the launcher (SIGTERM, exit code -15): which
    ranks get there first is a race, so each rank is 2 or -15, and the root cause is a 2."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out.h5ad"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "scmm.cli", "annotate", str(tmp_path / "missing.h5ad"), "--model", str(package),
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: input file not found: {tmp_path / 'missing.h5ad'}"], r.stderr[-4000:]
    assert r.returncode == 1 and "ChildFailedError" in r.stderr
    assert_ranks_exit_2(r.stderr)
    assert list(tmp_path.iterdir()) == []
