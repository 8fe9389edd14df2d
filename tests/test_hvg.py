"""data_pipeline.hvg: streaming Seurat-flavour HVG panel (parity with scanpy) and log1p CP10k profiles."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scmm.data_pipeline.hvg import hvg_panel, log1p_profiles, seurat_dispersion_norm
from scmm.data_pipeline.store import Corpus

N_GENES = 300
TYPES = ["CL:0000084", "CL:0000236", "CL:0000623", "CL:0001054"]


def _adata(n_cells: int = 600, seed: int = 0, log_input: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    types = np.array(TYPES)[rng.integers(0, len(TYPES), n_cells)]
    base = rng.gamma(0.6, 1.5, size=(len(TYPES), N_GENES))
    base[:, :20] *= 0.01  # some nearly silent genes
    for t in range(len(TYPES)):
        base[t, 20 + 10 * t:30 + 10 * t] += rng.uniform(2, 20, 10)
    depth = rng.lognormal(0, 0.5, n_cells)[:, None]
    counts = rng.poisson(base[[TYPES.index(t) for t in types]] * depth).astype(np.float32)
    counts[:, 25] += 1  # no empty cells
    counts[:, 299] = 0  # a gene never expressed
    obs = pd.DataFrame({"cell_type_ontology_term_id": pd.Categorical(types),
                        "tissue_ontology_term_id": "UBERON:0000178", "disease_ontology_term_id": "PATO:0000461",
                        "donor_id": pd.Categorical([f"d{i % 12}" for i in range(n_cells)]), "dataset_id": "ds"},
                       index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame({"feature_name": [f"GENE{i}" for i in range(N_GENES)]},
                       index=[f"ENSG9{i:010d}" for i in range(N_GENES)])
    x = counts
    if log_input:
        x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)


def _build(tmp: Path, adata: ad.AnnData, name: str) -> Corpus:
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    vocab = tmp / "vocab.json"
    vocab.write_text(json.dumps({f"GENE{i}": i for i in range(N_GENES)}))
    path = tmp / f"{name}.h5ad"
    adata.write_h5ad(path)
    build_corpus(BuildConfig(inputs=[path], out=tmp / name, vocab=str(vocab), shard_size=64, chunk_size=100,
                             progress=False))
    return Corpus(tmp / name)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hvg")
    counts = _adata()
    return counts, _build(tmp, counts, "counts"), _build(tmp, _adata(log_input=True), "logs")


def _scanpy_hvg(x_log: np.ndarray, n_top: int) -> np.ndarray:
    import scanpy as sc
    a = ad.AnnData(X=np.asarray(x_log, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=n_top)
    return np.flatnonzero(a.var["highly_variable"].to_numpy()), a.var["dispersions_norm"].to_numpy()


def _gene_order(corpus: Corpus) -> np.ndarray:
    """Corpus gene index -> column of the input h5ad."""
    return np.array([int(str(s)[4:]) for s in corpus.gene_symbols])


@pytest.mark.parametrize("which", ["counts", "logs"])
@pytest.mark.parametrize("n_top", [10, 50, 120])
def test_hvg_panel_matches_scanpy_seurat(corpora, which: str, n_top: int):
    adata, counts_corpus, logs_corpus = corpora
    corpus = counts_corpus if which == "counts" else logs_corpus
    assert corpus.manifest["normalization"] == {"counts": "counts", "logs": "normalized"}[which]
    ours = hvg_panel(corpus, n_top=n_top)
    assert ours.dtype == np.int64 and len(ours) == n_top and np.all(np.diff(ours) > 0)
    # the reference: scanpy on the train cells' log1p CP10k, computed from the original counts
    _, ids, _ = log1p_profiles(corpus, "train", np.arange(corpus.n_genes))
    sub = adata[ids]
    counts = sub.X.toarray().astype(np.float64)
    x_log = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, _gene_order(corpus)]
    ref, ref_norm = _scanpy_hvg(x_log, n_top)
    assert ours.tolist() == ref.tolist()


def test_dispersion_norm_matches_scanpy_values(corpora):
    adata, corpus, _ = corpora
    counts = adata.X.toarray().astype(np.float64)
    cp = counts / counts.sum(1, keepdims=True) * 1e4
    _, ref_norm = _scanpy_hvg(np.log1p(cp), 10)
    ours = seurat_dispersion_norm(cp.mean(0), cp.var(0, ddof=1))
    assert np.array_equal(np.isnan(ours), np.isnan(ref_norm))
    ok = ~np.isnan(ours)
    np.testing.assert_allclose(ours[ok], ref_norm[ok], rtol=1e-5, atol=1e-6)


def test_hvg_panel_all_genes_and_other_split(corpora):
    _, corpus, _ = corpora
    assert hvg_panel(corpus, n_top=corpus.n_genes).tolist() == list(range(corpus.n_genes))
    assert hvg_panel(corpus, n_top=10 ** 6).tolist() == list(range(corpus.n_genes))
    val = hvg_panel(corpus, n_top=30, split="val")
    assert len(val) == 30
    never = int(np.flatnonzero(_gene_order(corpus) == 299)[0])
    assert never not in hvg_panel(corpus, n_top=corpus.n_genes - 1)  # the silent gene ranks last


def test_log1p_profiles(corpora):
    adata, corpus, logs = corpora
    genes = np.array([3, 0, 40, 41, 250])
    x, ids, labels = log1p_profiles(corpus, "test", genes)
    assert x.dtype == np.float32 and x.shape == (len(ids), len(genes)) == (len(labels), 5)
    assert len(ids) == corpus.manifest["splits"]["test"]
    counts = adata[ids].X.toarray().astype(np.float64)
    # totals over ALL genes, then the slice
    expect = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, _gene_order(corpus)[genes]]
    np.testing.assert_allclose(x, expect, rtol=1e-5, atol=1e-5)
    assert labels == adata[ids].obs["cell_type_ontology_term_id"].astype(str).tolist()
    x2, ids2, _ = log1p_profiles(logs, "test", genes)
    order = {c: i for i, c in enumerate(ids2)}
    np.testing.assert_allclose(x2[[order[c] for c in ids]], x, rtol=1e-5, atol=1e-5)
    # a seeded subsample, in shard order
    xs, ids_s, labels_s = log1p_profiles(corpus, "test", genes, max_cells=7)
    assert len(ids_s) == 7 and ids_s == [c for c in ids if c in set(ids_s)]
    assert log1p_profiles(corpus, "test", genes, max_cells=7)[1] == ids_s
    np.testing.assert_array_equal(xs, x[[ids.index(c) for c in ids_s]])
    with pytest.raises(ValueError):
        log1p_profiles(corpus, "test", np.array([corpus.n_genes]))
