"""Baselines fitted on the corpus's train split and scored on its test split, next to scmm in the same report.

* **Expression**: :func:`expression_matrix` streams a split shard by shard. Count corpora are normalised per
  cell as ``log1p(x / total * 1e4)``, ``total`` being the cell's count over the whole corpus gene panel (before
  any gene subset); corpora built from log-normalised input (``manifest['normalization'] == 'log1p'``) are used
  as stored.
* **Highly variable genes** (:func:`highly_variable_genes`): over the train split, per gene mean ``m`` and
  variance ``v`` of the log1p values (streamed sums); dispersion ``log(v / m)``; genes binned into 20
  equal-width bins of ``m`` and the dispersion z-scored within each bin (Seurat-style; a bin with one gene gets
  z = 0); the ``n`` genes with the highest normalised dispersion among genes with ``m > 0``, ties by panel order.
* **Majority**: the most frequent train label (ties: the smallest label).
* **Logistic regression**: scikit-learn ``LogisticRegression`` (lbfgs, multinomial, L2 with ``C = 1``,
  ``max_iter = 1000``) on the log1p values *without* standardisation, as in the reference of DESIGN.md
  (pbmc68k_reduced, 5-fold CV: accuracy 0.829, macro-F1 0.671).
* **PCA + k-NN**: PCA(50) fitted on the train cells (centred, not scaled), 15 nearest train cells in PCA space
  by Euclidean distance (FAISS), majority vote with the nearest tied label winning (reference 0.793 / 0.628).
* **k-NN smoothing** (:func:`knn_smoothing`): a post-processing of *another* model's predictions, reported as
  its own row: each cell takes the majority of the predicted labels of its ``k`` nearest neighbours (itself
  included, so a tie keeps its own label) among the cells being predicted, in a PCA space of their expression.

Each baseline returns predictions; score them with :func:`eval.metrics.annotation_metrics`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from data_pipeline.store import Corpus, label_keys
from eval.knn import build_index, knn_search, knn_vote

__all__ = ["expression_matrix", "highly_variable_genes", "majority_baseline", "logistic_regression_baseline",
           "pca_knn_baseline", "knn_smoothing", "run_corpus_baselines"]

TARGET_SUM = 1e4


def _normalise(matrix: sp.csr_matrix, normalization: str) -> sp.csr_matrix:
    """log1p(x / total * 1e4) per cell for counts; log1p corpora unchanged. float32 CSR."""
    m = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    if normalization == "log1p":
        return m
    if normalization != "counts":
        raise ValueError(f"unknown corpus normalization {normalization!r}")
    totals = np.asarray(m.sum(axis=1)).ravel()
    scale = np.where(totals > 0, TARGET_SUM / np.maximum(totals, 1e-12), 0.0).astype(np.float32)
    m.data *= np.repeat(scale, np.diff(m.indptr))
    np.log1p(m.data, out=m.data)
    return m


def _resolve_genes(corpus: Corpus, genes: Sequence | np.ndarray | None) -> np.ndarray | None:
    """Panel column indices for ``genes`` (indices or symbols), or None for the whole panel."""
    if genes is None:
        return None
    genes = np.asarray(genes)
    if genes.dtype.kind in "iu":
        return genes.astype(np.int64)
    lookup = {str(s): i for i, s in enumerate(corpus.gene_symbols)}
    missing = [str(g) for g in genes if str(g) not in lookup]
    if missing:
        raise ValueError(f"genes not in the corpus panel: {missing[:5]}")
    return np.array([lookup[str(g)] for g in genes], dtype=np.int64)


def expression_matrix(corpus: Corpus, split: str, genes: Sequence | np.ndarray | None = None,
                      dense: bool = True) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray]:
    """(log1p-normalised expression float32 [n_cells, n_genes], label keys [n_cells]) of one split.

    ``genes``: panel column indices or gene symbols (default: the whole panel). ``dense=False`` returns CSR.
    Labels are the corpus's label keys (CL ID, or ``unmatched:<label>``), as in ``corpus.cell_types``.
    """
    cols = _resolve_genes(corpus, genes)
    normalization = corpus.manifest.get("normalization", "counts")
    entries = corpus.shards(split)
    n_genes = corpus.n_genes if cols is None else len(cols)
    n_cells = sum(int(e["n_cells"]) for e in entries)
    x = np.zeros((n_cells, n_genes), dtype=np.float32) if dense else None  # filled in place: no second copy
    blocks, labels, row = [], [], 0
    for entry in entries:
        shard = corpus.read_shard(entry["name"])
        m = _normalise(shard.matrix, normalization)
        if cols is not None:
            m = m[:, cols]
        if dense:
            x[row:row + m.shape[0]] = m.toarray()
        else:
            blocks.append(m)
        row += m.shape[0]
        labels.extend(label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"]))
    y = np.asarray(labels, dtype=object)
    if dense:
        return x, y
    return (sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)), y


def highly_variable_genes(corpus: Corpus, n: int = 2000, n_bins: int = 20) -> np.ndarray:
    """Panel indices (ascending) of the ``n`` most variable genes of the train split (module docstring)."""
    normalization = corpus.manifest.get("normalization", "counts")
    total = np.zeros(corpus.n_genes)
    total_sq = np.zeros(corpus.n_genes)
    n_cells = 0
    for entry in corpus.shards("train"):
        m = _normalise(corpus.read_shard(entry["name"]).matrix, normalization)
        total += np.asarray(m.sum(axis=0), dtype=np.float64).ravel()
        total_sq += np.asarray(m.multiply(m).sum(axis=0), dtype=np.float64).ravel()
        n_cells += m.shape[0]
    if n_cells < 2:
        raise ValueError("highly variable genes need at least 2 train cells")
    mean = total / n_cells
    var = np.maximum(total_sq / n_cells - mean ** 2, 0.0) * n_cells / (n_cells - 1)
    expressed = np.flatnonzero(mean > 0)
    if n >= len(expressed):
        return expressed
    disp = np.log(np.maximum(var[expressed], 1e-12) / mean[expressed])
    m = mean[expressed]
    edges = np.linspace(m.min(), m.max(), n_bins + 1)
    bins = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, n_bins - 1)
    z = np.zeros_like(disp)
    for b in np.unique(bins):
        sel = bins == b
        if sel.sum() > 1:
            sd = disp[sel].std(ddof=1)
            z[sel] = (disp[sel] - disp[sel].mean()) / sd if sd > 0 else 0.0
    order = np.lexsort((expressed, -z))  # highest z first, ties by panel index
    return np.sort(expressed[order[:n]])


def majority_baseline(y_train: Sequence, n: int) -> np.ndarray:
    """``n`` copies of the most frequent train label (ties: the smallest label)."""
    values, counts = np.unique(np.asarray(y_train).astype(str), return_counts=True)
    if not len(values):
        raise ValueError("no train labels")
    return np.full(n, values[int(np.argmax(counts))], dtype=object)


def logistic_regression_baseline(x_train: np.ndarray, y_train: Sequence, x_test: np.ndarray,
                                 max_iter: int = 1000, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Predictions of a multinomial logistic regression on log1p expression (not standardised)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y_train).astype(str)
    if len(np.unique(y)) < 2:
        return majority_baseline(y, x_test.shape[0])
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(x_train, y)
    return model.predict(x_test).astype(object)


def _pca(x_fit: np.ndarray, n_components: int, seed: int):
    from sklearn.decomposition import PCA

    k = max(1, min(n_components, x_fit.shape[0] - 1, x_fit.shape[1]))
    return PCA(n_components=k, svd_solver="auto", random_state=seed).fit(x_fit)


def pca_knn_baseline(x_train: np.ndarray, y_train: Sequence, x_test: np.ndarray, n_components: int = 50,
                     k: int = 15, seed: int = 0) -> np.ndarray:
    """Majority label of the ``k`` nearest train cells in a PCA space fitted on the train cells."""
    y = np.asarray(y_train).astype(str)
    pca = _pca(np.asarray(x_train), n_components, seed)
    z_train = pca.transform(x_train).astype(np.float32)
    z_test = pca.transform(x_test).astype(np.float32)
    _, ids = knn_search(build_index(z_train, "l2"), z_test, min(k, len(z_train)))
    pred, _ = knn_vote(y[ids])
    return pred.astype(object)


def knn_smoothing(pred_labels: Sequence, x_expr: np.ndarray, k: int = 15, n_components: int = 50,
                  seed: int = 0) -> np.ndarray:
    """Each cell's label by majority over the predicted labels of its ``k`` nearest cells (itself included).

    Neighbours are found among the same cells, by Euclidean distance in a PCA(``n_components``) space fitted
    on ``x_expr`` (log1p expression of those cells).
    """
    pred = np.asarray(pred_labels).astype(str)
    if len(pred) != x_expr.shape[0]:
        raise ValueError(f"{len(pred)} predictions for {x_expr.shape[0]} cells")
    if len(pred) <= 1:
        return pred.astype(object)
    x = np.asarray(x_expr.toarray() if sp.issparse(x_expr) else x_expr, dtype=np.float32)
    z = _pca(x, n_components, seed).transform(x).astype(np.float32)
    _, ids = knn_search(build_index(z, "l2"), z, min(k, len(z)))
    # each cell is its own nearest neighbour, even when exact duplicates tie with it
    self_id = np.arange(len(z))[:, None]
    others = np.take_along_axis(ids, np.argsort(ids == self_id, axis=1, kind="stable"), axis=1)
    ids = np.concatenate([self_id, others[:, :ids.shape[1] - 1]], axis=1)
    smoothed, _ = knn_vote(pred[ids])
    return smoothed.astype(object)


def run_corpus_baselines(corpus: Corpus, n_genes: int = 2000, seed: int = 0, n_components: int = 50,
                         k: int = 15, split: str = "test") -> dict[str, Any]:
    """Fit the baselines on the train split and predict ``split``: {"y_true", "genes", "predictions": {...}}.

    ``predictions`` maps ``majority``, ``logistic_regression`` and ``pca_knn`` to label arrays. ``x_test``
    (the HVG log1p matrix of ``split``) is returned for :func:`knn_smoothing` of scmm's predictions.
    """
    genes = highly_variable_genes(corpus, n_genes)
    x_train, y_train = expression_matrix(corpus, "train", genes)
    x_test, y_test = expression_matrix(corpus, split, genes)
    predictions = {
        "majority": majority_baseline(y_train, len(y_test)),
        "logistic_regression": logistic_regression_baseline(x_train, y_train, x_test, seed=seed),
        "pca_knn": pca_knn_baseline(x_train, y_train, x_test, n_components=n_components, k=k, seed=seed),
    }
    return {"y_true": y_test, "genes": genes, "x_test": x_test, "predictions": predictions}
