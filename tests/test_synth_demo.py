"""Tests for the bundled PBMC demo data (data_pipeline.demo_data) and the synthetic h5ad writer
(data_pipeline.synth)."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scmm.data_pipeline import synth
from scmm.data_pipeline.demo_data import BULK_LABEL_TO_CL, pbmc_demo_adata
from scmm.data_pipeline.synth import CELL_TYPES, load_census_vocab, synthesize

# measured: max |log1p(counts / n_counts * 1e4) - raw.X| = 5.0e-4 (raw.X is stored to 3 decimals)
RAW_TOL = 6e-4

EXPECTED_MAPPING = {
    "CD14+ Monocyte": "CL:0001054",
    "Dendritic": "CL:0000451",
    "CD19+ B": "CL:0000236",
    "CD4+/CD25 T Reg": "CL:0000815",
    "CD8+ Cytotoxic T": "CL:0000625",
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",
    "CD56+ NK": "CL:0000623",
    "CD4+/CD45RO+ Memory": "CL:0000897",
    "CD34+": "CL:0008001",
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",
}

LABEL_COLUMNS = {
    "cell_type_ontology_term_id": "cell_type",
    "tissue_ontology_term_id": "tissue",
    "disease_ontology_term_id": "disease",
    "sex_ontology_term_id": "sex",
    "development_stage_ontology_term_id": "development_stage",
    "assay_ontology_term_id": "assay",
}  # organism is checked literally: loading NCBITaxon in cellxgene-ontology-guide takes ~20 s
PREFIXES = {
    "cell_type_ontology_term_id": ("CL",),
    "tissue_ontology_term_id": ("UBERON",),
    "disease_ontology_term_id": ("MONDO", "PATO"),
    "sex_ontology_term_id": ("PATO",),
    "development_stage_ontology_term_id": ("HsapDv",),
    "assay_ontology_term_id": ("EFO",),
}


@pytest.fixture(scope="module")
def parser():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


def assert_ontology_columns(adata, parser):
    """Every *_ontology_term_id value is a valid, current term of the right ontology, and the label
    column next to it holds that term's label."""
    checked = 0
    for id_col, label_col in LABEL_COLUMNS.items():
        if id_col not in adata.obs:
            continue
        assert label_col in adata.obs, f"{id_col} without {label_col}"
        pairs = adata.obs[[id_col, label_col]].astype(str).drop_duplicates()
        for term, label in pairs.itertuples(index=False):
            assert term.split(":")[0] in PREFIXES[id_col], (id_col, term)
            assert parser.is_valid_term_id(term), term
            assert not parser.is_term_deprecated(term), term
            assert parser.get_term_label(term) == label, (term, label)
            checked += 1
        # one label per ID
        assert pairs[id_col].is_unique
    assert (adata.obs["organism_ontology_term_id"] == "NCBITaxon:9606").all()
    assert (adata.obs["organism"] == "Homo sapiens").all()
    return checked


def assert_integer_counts(X):
    assert sp.issparse(X) and X.format == "csr"
    assert X.dtype == np.float32
    assert X.data.size == 0 or X.data.min() >= 0
    np.testing.assert_array_equal(X.data, np.rint(X.data))


# ----------------------------------------------------------------------------------- demo data


@pytest.fixture(scope="module")
def demo():
    return pbmc_demo_adata()


def test_demo_shape_and_counts(demo):
    assert demo.shape == (700, 765)
    assert_integer_counts(demo.X)
    assert demo.X.nnz > 0 and demo.X.data.min() >= 1  # no stored zeros
    assert list(demo.var["feature_name"]) == list(demo.var_names)
    assert demo.var_names.is_unique


def test_demo_cell_types_match_mapping(demo, parser):
    assert BULK_LABEL_TO_CL == EXPECTED_MAPPING
    pairs = set(zip(demo.obs["bulk_labels"].astype(str), demo.obs["cell_type_ontology_term_id"].astype(str)))
    assert pairs == set(EXPECTED_MAPPING.items())
    assert demo.obs["cell_type_ontology_term_id"].nunique() == 10
    assert set(demo.obs["cell_type_ontology_term_id"].astype(str)) == set(EXPECTED_MAPPING.values())
    assert "donor_id" not in demo.obs  # the data has none; none are invented
    assert (demo.obs["dataset_id"] == "pbmc68k_reduced").all()
    assert (demo.obs["tissue_ontology_term_id"] == "UBERON:0000178").all()
    assert (demo.obs["disease_ontology_term_id"] == "PATO:0000461").all()
    assert (demo.obs["assay"] == "10x 3' v1").all()
    for col in demo.obs.columns:
        if col not in ("n_counts",):
            assert demo.obs[col].dtype == "category", col
    assert assert_ontology_columns(demo, parser) == 10 + 3  # 10 cell types, tissue, disease, assay


def test_demo_reproduces_scanpy_raw(demo):
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    raw = sp.csr_matrix(src.raw.X)
    raw.sort_indices()
    assert list(src.raw.var_names) == list(demo.var_names)
    assert list(src.obs_names) == list(demo.obs_names)
    n_counts = demo.obs["n_counts"].to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(n_counts, src.obs["n_counts"].to_numpy(dtype=np.float64))
    X = demo.X.astype(np.float64)
    rebuilt = sp.csr_matrix(sp.diags(1e4 / n_counts) @ X)
    rebuilt.data = np.log1p(rebuilt.data)
    rebuilt.sort_indices()
    np.testing.assert_array_equal(rebuilt.indptr, raw.indptr)
    np.testing.assert_array_equal(rebuilt.indices, raw.indices)
    max_diff = np.abs(rebuilt.data - raw.data).max()
    assert max_diff <= RAW_TOL, max_diff


# ----------------------------------------------------------------------------------- synthetic

N_CELLS, N_GENES = 3000, 200


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthesize(d / "a.h5ad", N_CELLS, N_GENES, seed=0, chunk_size=1000, progress=False)
    return d


@pytest.fixture(scope="module")
def synth_a(synth_dir):
    return ad.read_h5ad(synth_dir / "a.h5ad")


def test_synth_opens_backed_and_in_memory(synth_dir, synth_a):
    a = synth_a
    assert a.shape == (N_CELLS, N_GENES)
    assert_integer_counts(a.X)
    assert a.X.has_sorted_indices
    density = a.X.nnz / (N_CELLS * N_GENES)
    assert 0.03 < density < 0.2, density
    np.testing.assert_allclose(a.obs["n_counts"].to_numpy(), np.asarray(a.X.sum(axis=1)).ravel())
    b = ad.read_h5ad(synth_dir / "a.h5ad", backed="r")
    try:
        assert b.shape == (N_CELLS, N_GENES)
        assert b.isbacked
        part = b.X[1234:1300]
        assert sp.issparse(part)
        np.testing.assert_array_equal(part.toarray(), a.X[1234:1300].toarray())
        assert b.obs.equals(a.obs)
    finally:
        b.file.close()


def test_synth_var(synth_a):
    var = synth_a.var
    assert var.index.is_unique
    assert all(re.fullmatch(r"ENSG9\d{10}", g) for g in var.index)  # never a real ENSG0... ID
    vocab = load_census_vocab()
    symbols = var["feature_name"].astype(str)
    assert symbols.is_unique and all(s in vocab for s in symbols)
    assert list(var.index) == [f"ENSG9{vocab[s]:010d}" for s in symbols]
    assert {"CD3E", "MS4A1", "CD14", "ALB"} <= set(symbols)  # canonical markers are included
    assert (var["feature_reference"] == "NCBITaxon:9606").all()


def test_synth_obs_ontologies(synth_a, parser):
    obs = synth_a.obs
    for col in obs.columns:
        if col not in ("n_counts", "is_primary_data"):
            assert obs[col].dtype == "category", col
    assert obs["cell_type_ontology_term_id"].nunique() == 10
    assert set(obs["cell_type_ontology_term_id"].astype(str)) == {t.term_id for t in CELL_TYPES[:10]}
    assert assert_ontology_columns(synth_a, parser) > 10
    diseases = set(obs["disease_ontology_term_id"].astype(str))
    assert "PATO:0000461" in diseases and any(d.startswith("MONDO:") for d in diseases)
    assert set(obs["sex"].astype(str)) == {"female", "male"}
    # the catalogue beyond the first 10 types is valid too
    for t in CELL_TYPES:
        assert parser.get_term_label(t.term_id) == t.label
        assert parser.get_term_label(t.tissue_id) == t.tissue
        assert not parser.is_term_deprecated(t.term_id)


def test_synth_donors(synth_a):
    obs = synth_a.obs
    assert obs["donor_id"].nunique() == 8
    per_donor = obs.groupby("donor_id", observed=True).agg(
        {c: "nunique" for c in ("dataset_id", "sex", "disease", "development_stage")})
    assert (per_donor == 1).all().all()  # each donor: one dataset, one sex, one disease, one age
    assert obs["dataset_id"].nunique() == 3


def test_synth_marker_genes_higher_in_their_type(synth_a):
    a = synth_a
    markers = a.uns["synth"]["markers"]
    assert set(markers) == set(a.obs["cell_type_ontology_term_id"].astype(str))
    norm = sp.diags(1e4 / a.obs["n_counts"].to_numpy(dtype=np.float64)) @ a.X.astype(np.float64)
    norm = np.log1p(norm.toarray())
    pos = {g: i for i, g in enumerate(a.var_names)}
    types = a.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    for cl, genes in markers.items():
        cols = [pos[g] for g in genes]
        assert len(cols) == N_GENES // 20  # 200 genes / (2 * 10 types)
        inside = norm[types == cl][:, cols].mean(axis=0)
        outside = norm[types != cl][:, cols].mean(axis=0)
        assert inside.mean() > 2 * outside.mean(), cl
        assert (inside > outside).mean() >= 0.8, cl


def _load(path):
    a = ad.read_h5ad(path)
    a.X.sort_indices()
    return a


def _assert_same_file(a, b):
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.X.indptr, b.X.indptr)
    assert a.obs.equals(b.obs)
    assert a.var.equals(b.var)
    assert a.uns["synth"]["markers"].keys() == b.uns["synth"]["markers"].keys()
    for k in a.uns["synth"]["markers"]:
        np.testing.assert_array_equal(a.uns["synth"]["markers"][k], b.uns["synth"]["markers"][k])


def test_synth_deterministic_and_chunk_invariant(synth_dir, synth_a):
    synthesize(synth_dir / "same.h5ad", N_CELLS, N_GENES, seed=0, chunk_size=1000, progress=False)
    _assert_same_file(synth_a, _load(synth_dir / "same.h5ad"))
    for chunk in (7, 1024, 100_000):  # not a divisor, the block size, larger than the file
        synthesize(synth_dir / f"chunk{chunk}.h5ad", N_CELLS, N_GENES, seed=0, chunk_size=chunk, progress=False)
        _assert_same_file(synth_a, _load(synth_dir / f"chunk{chunk}.h5ad"))
    synthesize(synth_dir / "other.h5ad", N_CELLS, N_GENES, seed=1, chunk_size=1000, progress=False)
    other = _load(synth_dir / "other.h5ad")
    assert other.shape == synth_a.shape
    assert (other.X != synth_a.X).nnz > 0
    assert list(other.var["feature_name"]) != list(synth_a.var["feature_name"])


def test_synth_edge_sizes(tmp_path):
    vocab_size = len(load_census_vocab())
    synthesize(tmp_path / "one.h5ad", 1, 10, n_cell_types=17, n_donors=1, progress=False)
    one = ad.read_h5ad(tmp_path / "one.h5ad")
    assert one.shape == (1, 10) and one.obs["donor_id"].tolist() == ["donor_0"]
    synthesize(tmp_path / "all.h5ad", 2, vocab_size, progress=False)  # every vocabulary gene
    b = ad.read_h5ad(tmp_path / "all.h5ad", backed="r")
    try:
        assert b.shape == (2, vocab_size) and b.var_names.is_unique
    finally:
        b.file.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_cells=0), "n_cells"),
    (dict(n_cells=-5), "n_cells"),
    (dict(n_genes=9), "n_genes"),
    (dict(n_genes=10_000_000), "vocabulary"),
    (dict(n_cell_types=0), "n_cell_types"),
    (dict(n_cell_types=len(CELL_TYPES) + 1), "n_cell_types"),
    (dict(n_donors=0), "n_donors"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(seed=-1), "seed"),
    (dict(n_cells=2.5), "integer"),
])
def test_synth_bad_arguments(tmp_path, kwargs, match):
    args = dict(n_cells=10, n_genes=20) | kwargs
    with pytest.raises(ValueError, match=match):
        synthesize(tmp_path / "bad.h5ad", progress=False, **args)
    assert list(tmp_path.iterdir()) == []


def test_synth_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        synthesize(tmp_path / "nope" / "x.h5ad", 10, 20, progress=False)


def test_synth_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth._generate_block

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(synth, "_generate_block", failing)
    with pytest.raises(RuntimeError, match="boom"):
        synthesize(tmp_path / "x.h5ad", 5000, 50, chunk_size=500, progress=False)
    assert list(tmp_path.iterdir()) == []
