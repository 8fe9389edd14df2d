"""Corpus build: contents, splits, atomicity, the CLI and every kind of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import CELL_TYPES, GENES, make_adata, run_cli
from scmm.data_pipeline.build import BuildConfig, build_corpus
from scmm.data_pipeline.splits import assign_cells, assign_groups, plan_splits
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab, map_genes
from scmm.errors import ScmmError


def test_vocab_maps_symbols_and_ensembl_ids():
    vocab = GeneVocab.load()
    assert len(vocab) == 60694 + 3 and vocab.lookup("CD3D") >= 0
    assert vocab.lookup("cd3d") == vocab.lookup("CD3D")  # case-insensitive fallback
    ens = next(t for t in vocab.token_to_id if t.startswith("ENSG"))
    assert vocab.lookup(ens + ".7") == vocab.token_to_id[ens]  # version suffix stripped
    assert vocab.lookup("NOT_A_GENE") == -1
    import pandas as pd
    var = pd.DataFrame({"feature_name": ["CD3D", "XYZ_UNKNOWN"]}, index=[ens + ".1", "ENSG90000000001"])
    m = map_genes(var, vocab)
    assert m.column == "feature_name" and m.n_mapped == 1 and m.unmapped_examples() == ["XYZ_UNKNOWN"]


def test_splits_keep_groups_whole_and_hit_fractions():
    groups = np.repeat([f"d{i}" for i in range(20)], 50)
    split = assign_groups(groups, (0.8, 0.1, 0.1), seed=3)
    for g in np.unique(groups):
        assert len(np.unique(split[groups == g])) == 1
    assert np.bincount(split, minlength=3).tolist() == [800, 100, 100]
    labels = np.repeat(["a", "b"], [90, 10])
    cells = assign_cells(labels, (0.8, 0.1, 0.1), seed=0)
    assert np.bincount(cells[labels == "b"], minlength=3).tolist() == [8, 1, 1]  # stratified


def test_split_falls_back_from_donor_to_dataset_to_cell():
    import pandas as pd
    obs = pd.DataFrame({"donor_id": ["unknown"] * 30, "dataset_id": np.repeat(["a", "b", "c"], 10)})
    assert plan_splits(obs, np.zeros(30)).group_by == "dataset_id"
    assert plan_splits(obs.drop(columns="dataset_id"), np.zeros(30)).group_by == "cell"


def test_build_round_trip(small_corpus: Path, tmp_path: Path):
    corpus = Corpus(small_corpus)
    m = corpus.manifest
    assert m["n_cells"] == 400 and m["n_genes"] == len(GENES) and m["normalization"] == "counts"
    assert sorted(m["cell_types"]) == sorted(CELL_TYPES)
    assert m["cell_types"]["CL:0000236"] == {"label": "B cell", "count": 100,
                                             "splits": m["cell_types"]["CL:0000236"]["splits"]}
    assert sum(m["splits"].values()) == 400 and m["split_group_by"] == "donor_id"
    # the expression round-trips exactly (genes reordered onto the panel, which is sorted by vocab id)
    src = make_adata(n_cells=400, donors=10)
    vocab = GeneVocab.load()
    order = np.argsort([vocab.lookup(g) for g in GENES])
    assert [str(s) for s in corpus.gene_symbols] == [GENES[i] for i in order]
    seen = 0
    donors_per_split: dict[str, set] = {}
    for entry in corpus.shards():
        shard = corpus.read_shard(entry["name"])
        assert entry["n_cells"] <= 16 and shard.n_cells == entry["n_cells"]
        rows = [int(c.split("_")[1]) for c in shard.obs["cell_id"]]
        np.testing.assert_array_equal(shard.matrix.toarray(), src.X[rows][:, order].toarray())
        assert all(t.strip() for t in shard.obs["text"])
        assert list(shard.obs["cell_type_ontology_term_id"]) == list(src.obs["cell_type_ontology_term_id"].iloc[rows])
        donors_per_split.setdefault(entry["split"], set()).update(shard.obs["donor_id"])
        seen += shard.n_cells
    assert seen == 400
    splits = list(donors_per_split.values())
    assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1:])  # no donor in two splits


def test_build_is_deterministic(tmp_path: Path, h5ad_path: Path):
    for name in ("a", "b"):
        build_corpus(BuildConfig(inputs=[h5ad_path], out=tmp_path / name, shard_size=32, progress=False))
    ma, mb = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("a", "b"))
    assert [s["checksums"] for s in ma["shards"]] == [s["checksums"] for s in mb["shards"]]


def test_labels_by_name_log_input_and_two_files(tmp_path: Path):
    a = make_adata(n_cells=40)
    a.obs["my_type"] = a.obs["cell_type_ontology_term_id"].map(
        {"CL:0000084": "T cell", "CL:0000236": "B cells", "CL:0000623": "natural killer cell",
         "CL:0001054": "CD14-positive monocyte"}).astype(str)
    a.obs = a.obs.drop(columns="cell_type_ontology_term_id")
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))  # log-normalised input
    a.write_h5ad(tmp_path / "a.h5ad")
    b = a.copy()
    b.write_h5ad(tmp_path / "b.h5ad")  # same cell names: qualified by file
    m = build_corpus(BuildConfig(inputs=[tmp_path / "a.h5ad", tmp_path / "b.h5ad"], out=tmp_path / "c",
                                 cell_type_column="my_type", progress=False))
    # log1p(counts) is detected as log1p (expm1 gives the counts back) and stored as linear values
    assert m["normalization"] == "normalized" and m["n_cells"] == 80
    assert [f["input_scale"]["scale"] for f in m["gene_coverage"]["files"]] == ["log1p", "log1p"]
    assert sorted(m["cell_types"]) == sorted(CELL_TYPES)


def test_build_holds_obs_as_codes_and_reads_cell_ids_per_chunk(tmp_path: Path):
    """Bounded memory: pass 1 keeps one categorical code per column per cell, no cell ID or text; an extra column
    only one file has is '' for the other's cells; a cell ID twice in one file is an error; IDs shared by two files
    are qualified by file name, read chunk by chunk."""
    from scmm.data_pipeline.build import _plan_corpus
    from scmm.data_pipeline.ontology import get_ontology

    a, b = make_adata(n_cells=60, seed=1), make_adata(n_cells=50, seed=2)
    a.obs["assay"] = "10x 3' v3"
    a.write_h5ad(tmp_path / "a.h5ad"), b.write_h5ad(tmp_path / "b.h5ad")
    cfg = BuildConfig(inputs=[tmp_path / "a.h5ad", tmp_path / "b.h5ad"], out=tmp_path / "c", shard_size=16,
                      chunk_size=7, progress=False)
    plan = _plan_corpus(cfg, GeneVocab.load(None), get_ontology())
    assert all(str(t) == "category" for t in plan.obs.dtypes) and plan.qualify_ids
    assert isinstance(plan.obs.index, __import__("pandas").RangeIndex)
    assert plan.obs.memory_usage(index=False, deep=True).sum() < 110 * len(plan.obs.columns) + 20_000
    build_corpus(cfg)
    corpus = Corpus(tmp_path / "c")
    obs = {k: np.concatenate([s.obs[k] for s in corpus.iter_shards()]) for k in ("cell_id", "assay", "source_file")}
    assert sorted(obs["cell_id"]) == sorted([f"a.h5ad:{c}" for c in a.obs_names] + [f"b.h5ad:{c}" for c in b.obs_names])
    assert set(obs["assay"][obs["source_file"] == "a.h5ad"]) == {"10x 3' v3"}
    assert set(obs["assay"][obs["source_file"] == "b.h5ad"]) == {""}
    a.obs_names = ["x"] + list(a.obs_names[1:-1]) + ["x"]
    a.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(ScmmError, match="duplicated cell IDs.*'x'"):
        build_corpus(BuildConfig(inputs=[tmp_path / "dup.h5ad"], out=tmp_path / "d", progress=False))


def test_jobs_1_and_2_build_the_same_corpus(tmp_path: Path):
    """--jobs N: worker processes encode chunks, one writer takes them in order: every array (checksums) and the
    manifest apart from its time stamp are the same for 1 and 2 jobs; two files, chunks smaller than shards."""
    make_adata(n_cells=90, seed=3).write_h5ad(tmp_path / "a.h5ad")
    make_adata(n_cells=70, seed=4).write_h5ad(tmp_path / "b.h5ad")
    manifests = []
    for jobs in (1, 2):
        m = build_corpus(BuildConfig(inputs=[tmp_path / "a.h5ad", tmp_path / "b.h5ad"], out=tmp_path / f"j{jobs}",
                                     shard_size=24, chunk_size=11, jobs=jobs, progress=False))
        m.pop("created")
        manifests.append(m)
    assert manifests[0] == manifests[1] and len(manifests[0]["shards"]) > 4
    r = run_cli("data", "build", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "c"), "--jobs", "0", "--quiet")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "argument --jobs" in r.stderr


def test_unmatched_labels_reported_or_dropped(tmp_path: Path):
    a = make_adata(n_cells=40)
    a.obs["lab"] = ["T cell"] * 20 + ["weird blob"] * 20
    a.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(ScmmError, match="'weird blob'"):
        build_corpus(BuildConfig(inputs=[tmp_path / "a.h5ad"], out=tmp_path / "c", cell_type_column="lab",
                                 progress=False))
    m = build_corpus(BuildConfig(inputs=[tmp_path / "a.h5ad"], out=tmp_path / "c", cell_type_column="lab",
                                 unmatched_labels="drop", progress=False))
    assert m["n_cells"] == 20 and list(m["cell_types"]) == ["CL:0000084"]
    m = build_corpus(BuildConfig(inputs=[tmp_path / "a.h5ad"], out=tmp_path / "d", cell_type_column="lab",
                                 label_map={"weird blob": "CL:0000236"}, progress=False))
    assert sorted(m["cell_types"]) == ["CL:0000084", "CL:0000236"]


def test_interrupted_build_leaves_nothing(tmp_path: Path, h5ad_path: Path, monkeypatch):
    import scmm.data_pipeline.build as build
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(build, "_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(BuildConfig(inputs=[h5ad_path], out=tmp_path / "c", progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.h5ad"]


def test_cli_demo_and_info(tmp_path: Path):
    r = run_cli("data", "demo", "--out", str(tmp_path / "demo"), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("data", "info", str(tmp_path / "demo"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n_cells"] == 700 and info["n_texts"] == 700 and len(info["cell_types"]) == 10
    assert all(k.startswith("CL:") and v["label"] for k, v in info["cell_types"].items())
    assert sum(info["splits"].values()) == 700 and set(info["splits"]) == {"train", "val", "test"}
    assert info["gene_coverage"]["coverage"] > 0.9
    r = run_cli("data", "info", str(tmp_path / "demo"))
    assert r.returncode == 0 and "CD14-positive monocyte" in r.stdout


# --- bad input: one `error:` line, exit 2, no traceback, nothing written --------------------------
def _bad(tmp_path: Path, adata: ad.AnnData, *extra: str) -> str:
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    return _expect_error(tmp_path, "data", "build", str(path), "--out", str(tmp_path / "out"), *extra)


def _expect_error(tmp_path: Path, *args: str) -> str:
    before = set(tmp_path.iterdir())
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert set(tmp_path.iterdir()) == before  # nothing half written
    return lines[0]


def test_error_missing_file(tmp_path: Path):
    assert "not found" in _expect_error(tmp_path, "data", "build", str(tmp_path / "nope.h5ad"),
                                        "--out", str(tmp_path / "o"))


def test_error_not_h5ad(tmp_path: Path):
    (tmp_path / "x.h5ad").write_text("hello")
    assert "not an h5ad" in _expect_error(tmp_path, "data", "build", str(tmp_path / "x.h5ad"),
                                          "--out", str(tmp_path / "o"))


def test_error_missing_label_column(tmp_path: Path):
    a = make_adata(40)
    a.obs = a.obs.drop(columns="cell_type_ontology_term_id")
    msg = _bad(tmp_path, a)
    assert "cell_type_ontology_term_id" in msg and "--cell-type-column" in msg
    assert "'celltype'" in _bad(tmp_path, make_adata(40), "--cell-type-column", "celltype")


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative")])
def test_error_bad_values(tmp_path: Path, value: float, word: str):
    a = make_adata(40)
    x = a.X.toarray()
    x[35, 3] = value
    a.X = sp.csr_matrix(x)
    assert word in _bad(tmp_path, a, "--chunk-size", "10")


def test_error_empty_matrix(tmp_path: Path):
    assert "empty" in _bad(tmp_path, make_adata(40)[:0].copy())


def test_error_duplicated_genes(tmp_path: Path):
    genes = list(GENES)
    genes[5] = genes[4]
    assert "duplicated gene names" in _bad(tmp_path, make_adata(40, genes=genes))


def test_error_low_gene_coverage(tmp_path: Path):
    genes = list(GENES[:5]) + [f"FAKE{i}" for i in range(15)]
    msg = _bad(tmp_path, make_adata(40, genes=genes))
    assert "5/20" in msg and "FAKE0" in msg and "feature_name" in msg


def test_error_unknown_ontology_id(tmp_path: Path):
    a = make_adata(40)
    a.obs["cell_type_ontology_term_id"] = a.obs["cell_type_ontology_term_id"].astype(str)
    a.obs.iloc[0, 0] = "CL:9999999"
    assert "CL:9999999" in _bad(tmp_path, a)
    b = make_adata(40)
    b.obs["tissue_ontology_term_id"] = "UBERON:9999999"
    assert "UBERON:9999999" in _bad(tmp_path, b)


def test_error_output_exists(tmp_path: Path, h5ad_path: Path):
    (tmp_path / "out").mkdir()
    assert "already exists" in _expect_error(tmp_path, "data", "build", str(h5ad_path), "--out", str(tmp_path / "out"))


def test_error_corrupted_shard(tmp_path: Path, h5ad_path: Path):
    build_corpus(BuildConfig(inputs=[h5ad_path], out=tmp_path / "c", shard_size=32, progress=False))
    shard = Corpus(tmp_path / "c").shards("train")[1]["name"]
    chunk = next((tmp_path / "c" / "shards" / shard / "data").rglob("c*/*")) if \
        any((tmp_path / "c" / "shards" / shard / "data").rglob("c*/*")) else \
        next(p for p in (tmp_path / "c" / "shards" / shard / "data").rglob("*")
             if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    msg = _expect_error(tmp_path, "data", "info", str(tmp_path / "c"))
    assert shard in msg and "corrupted" in msg


def test_incomplete_corpus_does_not_open(tmp_path: Path, h5ad_path: Path):
    build_corpus(BuildConfig(inputs=[h5ad_path], out=tmp_path / "c", progress=False))
    (tmp_path / "c" / "manifest.json").unlink()
    assert "not a complete scmm corpus" in _expect_error(tmp_path, "data", "info", str(tmp_path / "c"))
