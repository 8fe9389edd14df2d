"""Highly variable genes of a corpus split, and log1p CP10k expression profiles, both read shard by shard.

**Normalisation.** A cell's log1p CP10k profile is ``log1p(x / total * 1e4)`` where ``total`` is the cell's count
over the *whole* corpus gene panel (before any gene subset):
:func:`scmm.data_pipeline.encoding.log1p_normalize`, as a model reads a corpus of counts.
Corpora built from log-normalised input (``'log1p'``) are used as stored.

**Highly variable genes** (:func:`hvg_panel`): the same statistic as scanpy's
``sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n)`` on the split's log1p CP10k matrix, computed
without materialising it:

* scanpy's seurat flavour undoes the log (``expm1``), so the per-gene mean ``m`` and variance ``v`` (ddof 1) are
  those of the CP10k values; they are accumulated per shard and merged with Chan's parallel formula
  (numerically stable; memory O(n_genes));
* dispersion ``d = log(v / m)`` (NaN for genes with ``v = 0``, including genes never expressed: scanpy sets
  ``m = 1e-12`` there, so ``v / m = 0``); binned mean ``log1p(m)``;
* genes are cut into 20 equal-width bins of ``log1p(m)`` as ``pandas.cut`` does (range widened by 0.1% below,
  right-closed intervals); within each bin the dispersion is z-scored with the mean and the ddof-1 standard
  deviation of the bin's non-NaN dispersions; a bin with a single such gene gives it a normalised dispersion
  of 1 (scanpy's rule);
* the ``n_top`` genes with the highest normalised dispersion are returned, ties broken by panel index; genes
  with NaN normalised dispersion rank last (scanpy returns fewer than ``n_top`` genes then, this returns
  ``n_top``). ``n_top >= n_genes`` returns every gene.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scmm.data_pipeline.collate import CP10K, log1p_normalize
from scmm.data_pipeline.store import Corpus, label_keys

__all__ = ["hvg_panel", "log1p_profiles", "iter_log1p_profiles", "seurat_dispersion_norm"]

N_BINS = 20


def _log1p(corpus: Corpus, matrix: sp.csr_matrix, dtype: type = np.float32) -> sp.csr_matrix:
    """log1p CP10k of a shard over the whole corpus panel (the loader's normalisation)."""
    return log1p_normalize(matrix, corpus.manifest.get("normalization", "counts"), CP10K, dtype)


def _shard_moments(m: sp.csr_matrix) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, M2 = sum of squared deviations) per column of a sparse float64 matrix, zeros included."""
    n = m.shape[0]
    mean = np.asarray(m.sum(axis=0)).ravel() / n
    coo = m.tocoo()
    dev = coo.data - mean[coo.col]
    m2 = np.bincount(coo.col, weights=dev * dev, minlength=m.shape[1])
    nnz = np.bincount(coo.col, minlength=m.shape[1])
    m2 += (n - nnz) * mean ** 2  # the implicit zeros
    return n, mean, m2


def _pandas_cut_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value as ``pandas.cut(x, n_bins)`` assigns it (equal width, right-closed)."""
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:  # pandas widens a constant range by 0.1% on both sides: everything lands in the middle bin
        lo, hi = lo - 0.001 * abs(lo) if lo != 0 else -0.001, hi + 0.001 * abs(hi) if hi != 0 else 0.001
        edges = np.linspace(lo, hi, n_bins + 1)
    else:
        edges = np.linspace(lo, hi, n_bins + 1)
        edges[0] -= (hi - lo) * 0.001
    return np.clip(np.searchsorted(edges, x, side="left") - 1, 0, n_bins - 1)


def seurat_dispersion_norm(mean: np.ndarray, var: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Seurat-flavour normalised dispersion from per-gene mean and variance of the CP10k values (module doc)."""
    mean = np.asarray(mean, dtype=np.float64).copy()
    var = np.asarray(var, dtype=np.float64)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = var / mean
        disp[disp == 0] = np.nan
        disp = np.log(disp)
    bins = _pandas_cut_bins(np.log1p(mean), n_bins)
    out = np.full(len(mean), np.nan)
    ok = ~np.isnan(disp)
    for b in np.unique(bins[ok]):
        sel = (bins == b) & ok
        d = disp[sel]
        if len(d) == 1:
            out[sel] = 1.0  # (d - 0) / d, as scanpy
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            out[sel] = (d - d.mean()) / d.std(ddof=1)
    return out


def hvg_panel(corpus: Corpus, n_top: int = 2000, split: str = "train") -> np.ndarray:
    """Sorted corpus gene indices (int64) of the ``n_top`` most highly variable genes of ``split`` (module doc)."""
    n_genes = corpus.n_genes
    if n_top >= n_genes:
        return np.arange(n_genes, dtype=np.int64)
    if n_top < 1:
        raise ValueError(f"n_top must be >= 1, got {n_top}")
    n_tot, mean, m2 = 0, np.zeros(n_genes), np.zeros(n_genes)
    for shard in corpus.iter_shards(split, columns=()):
        if shard.n_cells == 0:
            continue
        cp10k = _log1p(corpus, shard.matrix, np.float64)
        np.expm1(cp10k.data, out=cp10k.data)  # scanpy's seurat flavour undoes the log
        n_b, mean_b, m2_b = _shard_moments(cp10k)
        n_new = n_tot + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n_new)
        m2 = m2 + m2_b + delta ** 2 * (n_tot * n_b / n_new)
        n_tot = n_new
    if n_tot < 2:
        raise ValueError(f"highly variable genes need at least 2 cells in split '{split}', found {n_tot}")
    var = m2 / (n_tot - 1)
    norm = seurat_dispersion_norm(mean, var)
    key = np.where(np.isnan(norm), -np.inf, norm)
    order = np.lexsort((np.arange(n_genes), -key))  # highest first, ties by panel index
    return np.sort(order[:n_top]).astype(np.int64)


def log1p_profiles(corpus: Corpus, split: str, genes: np.ndarray, max_cells: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """(X float32 [n, len(genes)], cell IDs, label keys) of ``split``, in shard order, read shard by shard.

    X is log1p CP10k computed on the whole panel's totals, then sliced to ``genes`` (corpus gene indices,
    e.g. :func:`hvg_panel`). Labels are the corpus's label keys (CL ID, or ``unmatched:<label>`` for kept
    free-text labels), as in ``corpus.cell_types``. With ``max_cells`` below the split size, a seeded uniform
    subsample of ``max_cells`` cells is kept (still in shard order); memory is O(kept cells x len(genes)).
    """
    genes = np.asarray(genes, dtype=np.int64)
    if genes.ndim != 1 or (genes.size and (genes.min() < 0 or genes.max() >= corpus.n_genes)):
        raise ValueError(f"genes must be 1-D corpus gene indices in [0, {corpus.n_genes})")
    entries = corpus.shards(split)
    n_cells = sum(int(e["n_cells"]) for e in entries)
    keep = None
    if max_cells is not None and max_cells < n_cells:
        keep = np.zeros(n_cells, dtype=bool)
        keep[np.random.default_rng(seed).choice(n_cells, max(int(max_cells), 0), replace=False)] = True
    n_out = n_cells if keep is None else int(keep.sum())
    x = np.zeros((n_out, len(genes)), dtype=np.float32)
    ids: list[str] = []
    labels: list[str] = []
    row, start = 0, 0
    for entry in entries:
        n = int(entry["n_cells"])
        sel = None if keep is None else np.flatnonzero(keep[start:start + n])
        start += n
        if sel is not None and sel.size == 0:
            continue
        shard = corpus.read_shard(entry["name"], columns=("cell_id", "cell_type_ontology_term_id", "cell_type"))
        m = _log1p(corpus, shard.matrix)
        cell_ids = shard.obs["cell_id"]
        keys = label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"])
        if sel is not None:
            m = m[sel]
            cell_ids = cell_ids[sel]
            keys = [keys[i] for i in sel]
        x[row:row + m.shape[0]] = m[:, genes].toarray()
        row += m.shape[0]
        ids += [str(c) for c in cell_ids]
        labels += [str(k) for k in keys]
    return x, ids, labels


def iter_log1p_profiles(corpus: Corpus, split: str, genes: np.ndarray):
    """Yield (X float32 [shard cells, len(genes)], cell IDs, label keys) per shard of ``split``, in shard order.

    The same values as :func:`log1p_profiles`, one shard in memory at a time (for splits too large to hold).
    """
    genes = np.asarray(genes, dtype=np.int64)
    if genes.ndim != 1 or (genes.size and (genes.min() < 0 or genes.max() >= corpus.n_genes)):
        raise ValueError(f"genes must be 1-D corpus gene indices in [0, {corpus.n_genes})")
    for shard in corpus.iter_shards(split, columns=("cell_id", "cell_type_ontology_term_id", "cell_type")):
        m = _log1p(corpus, shard.matrix)[:, genes]
        keys = label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"])
        yield m.toarray(), [str(c) for c in shard.obs["cell_id"]], [str(k) for k in keys]
