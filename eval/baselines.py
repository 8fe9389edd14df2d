"""Baselines fitted on the corpus's train split and scored on its test split, next to scmm in the same report.

* **Expression**: log1p CP10k profiles streamed shard by shard (:func:`scmm.data_pipeline.hvg.log1p_profiles`,
  the normalisation a model reads), over the highly variable genes of the train split
  (:func:`scmm.data_pipeline.hvg.hvg_panel`: scanpy's ``flavor="seurat"`` statistic; the whole panel when ``n``
  is at least its size).
* **Memory** (:func:`run_corpus_baselines`): the models are fitted on at most ``BASELINE_MAX_TRAIN_CELLS``
  (20,000) train cells, a seeded uniform subsample (``numpy.random.default_rng(seed)``) beyond that, held dense
  over the HVG panel (20,000 x 2,000 float32 = 160 MB); the evaluated split is streamed shard by shard (one
  shard dense at a time, predictions and 50-d PCA coordinates kept), so memory does not grow with its size.
* **Majority**: the most frequent train label (ties: the smallest label).
* **Logistic regression**: scikit-learn ``LogisticRegression`` (lbfgs, multinomial, L2 with ``C = 1``,
  ``max_iter = 1000``) on the log1p values *without* standardisation, as in the reference of DESIGN.md
  (pbmc68k_reduced, 5-fold CV: accuracy 0.829, macro-F1 0.671).
* **PCA + k-NN**: PCA(50) fitted on the train cells (centred, not scaled), 15 nearest train cells in PCA space
  by Euclidean distance (FAISS), majority vote with the nearest tied label winning (reference 0.793 / 0.628).
* **k-NN smoothing** (:func:`knn_smoothing`): a post-processing of *another* model's predictions, reported as
  its own row: each cell takes the majority of the predicted labels of its ``k`` nearest neighbours (itself
  included, so a tie keeps its own label) among the cells being predicted, in a PCA space of their expression
  (in :func:`run_corpus_baselines`: the PCA fitted on the train cells, ``z_test``). ``k`` scales with the number
  of cells ``n`` being smoothed (:func:`smoothing_k`): ``k = min(15, max(3, round(sqrt(n) / 2)))``. Reasoning,
  fixed before looking at any test score: a vote over ``k`` neighbours erases every class with fewer than about
  ``k / 2`` cells in the split (its members' neighbourhoods are mostly other cells), so ``k`` must stay well
  below the size of the small classes; class sizes grow with ``n``, so ``k`` grows sub-linearly with it,
  capped at the usual 15 (reached at 900 cells) and at least 3 so that a vote can overrule a single cell.
  A 70-cell split gets ``k = 4``.

Each baseline returns predictions; score them with :func:`eval.metrics.annotation_metrics`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from scmm.data_pipeline.hvg import hvg_panel, iter_log1p_profiles, log1p_profiles
from scmm.data_pipeline.store import Corpus
from scmm.eval.knn import build_index, knn_search, knn_vote

__all__ = ["majority_baseline", "logistic_regression_baseline",
           "pca_knn_baseline", "knn_smoothing", "smoothing_k", "run_corpus_baselines", "BASELINE_MAX_TRAIN_CELLS"]

BASELINE_MAX_TRAIN_CELLS = 20_000


def majority_baseline(y_train: Sequence, n: int) -> np.ndarray:
    """``n`` copies of the most frequent train label (ties: the smallest label)."""
    values, counts = np.unique(np.asarray(y_train).astype(str), return_counts=True)
    if not len(values):
        raise ValueError("no train labels")
    return np.full(n, values[int(np.argmax(counts))], dtype=object)


def logistic_regression_baseline(x_train: np.ndarray, y_train: Sequence, x_test: np.ndarray,
                                 max_iter: int = 1000, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Predictions of a multinomial logistic regression on log1p expression (not standardised)."""
    y = np.asarray(y_train).astype(str)
    if len(np.unique(y)) < 2:
        return majority_baseline(y, x_test.shape[0])
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(x_train, y)
    return model.predict(x_test).astype(object)


def _pca(x_fit: np.ndarray, n_components: int, seed: int) -> PCA:
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


def smoothing_k(n: int) -> int:
    """Neighbours of the k-NN smoothing for ``n`` cells: ``min(15, max(3, round(sqrt(n) / 2)))`` (module doc)."""
    return int(min(15, max(3, round(np.sqrt(max(n, 0)) / 2))))


def knn_smoothing(pred_labels: Sequence, x_expr: np.ndarray, k: int | None = 15, n_components: int = 50,
                  seed: int = 0, fit_pca: bool = True) -> np.ndarray:
    """Each cell's label by majority over the predicted labels of its ``k`` nearest cells (itself included).

    Neighbours are found among the same cells, by Euclidean distance in a PCA(``n_components``) space fitted
    on ``x_expr`` (log1p expression of those cells), or directly in ``x_expr`` with ``fit_pca=False`` (e.g.
    coordinates already in a PCA space). ``k=None``: :func:`smoothing_k` of the number of cells.
    """
    pred = np.asarray(pred_labels).astype(str)
    if len(pred) != x_expr.shape[0]:
        raise ValueError(f"{len(pred)} predictions for {x_expr.shape[0]} cells")
    if len(pred) <= 1:
        return pred.astype(object)
    if k is None:
        k = smoothing_k(len(pred))
    x = np.asarray(x_expr.toarray() if sp.issparse(x_expr) else x_expr, dtype=np.float32)
    z = _pca(x, n_components, seed).transform(x).astype(np.float32) if fit_pca else np.ascontiguousarray(x)
    _, ids = knn_search(build_index(z, "l2"), z, min(k, len(z)))
    # each cell is its own nearest neighbour, even when exact duplicates tie with it
    self_id = np.arange(len(z))[:, None]
    others = np.take_along_axis(ids, np.argsort(ids == self_id, axis=1, kind="stable"), axis=1)
    ids = np.concatenate([self_id, others[:, :ids.shape[1] - 1]], axis=1)
    smoothed, _ = knn_vote(pred[ids])
    return smoothed.astype(object)


def run_corpus_baselines(corpus: Corpus, n_genes: int = 2000, seed: int = 0, n_components: int = 50,
                         k: int = 15, split: str = "test",
                         max_train_cells: int | None = BASELINE_MAX_TRAIN_CELLS,
                         genes: np.ndarray | None = None) -> dict[str, Any]:
    """Fit the baselines on the train split and predict ``split`` (streamed; see the module docstring).

    Returns {"y_true", "genes", "predictions", "z_test", "n_train_used"}: ``predictions`` maps ``majority``,
    ``logistic_regression`` and ``pca_knn`` to label arrays in shard order; ``z_test`` [n, n_components] holds the
    cells of ``split`` in the train-fitted PCA space, for :func:`knn_smoothing` (``fit_pca=False``) of scmm's
    predictions. ``max_train_cells`` None fits on every train cell. ``genes``: the panel when the caller already
    chose it (``hvg_panel(corpus, n_genes, "train")``, one pass over the train split).
    """
    genes = hvg_panel(corpus, n_genes, "train") if genes is None else np.asarray(genes, dtype=np.int64)
    x_train, _, y_train = log1p_profiles(corpus, "train", genes, max_cells=max_train_cells, seed=seed)
    y_train = np.asarray(y_train).astype(str)
    if len(y_train) < 2:
        raise ValueError(f"the baselines need at least 2 train cells, found {len(y_train)}")
    lr = None
    if len(np.unique(y_train)) >= 2:
        lr = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(x_train, y_train)
    pca = _pca(x_train, n_components, seed)
    z_train = pca.transform(x_train).astype(np.float32)
    del x_train
    index = build_index(z_train, "l2")
    k_train = min(k, len(z_train))
    majority = majority_baseline(y_train, 1)[0]
    y_true, pred_lr, pred_knn, z_parts = [], [], [], []
    for x, _, labels in iter_log1p_profiles(corpus, split, genes):
        y_true += labels
        pred_lr.append(lr.predict(x).astype(object) if lr is not None else np.full(len(x), majority, dtype=object))
        z = pca.transform(x).astype(np.float32)
        _, ids = knn_search(index, z, k_train)
        pred_knn.append(knn_vote(y_train[ids])[0].astype(object))
        z_parts.append(z)
    index.reset()
    y = np.asarray(y_true, dtype=object)
    empty = np.zeros(0, dtype=object)
    predictions = {
        "majority": majority_baseline(y_train, len(y)),
        "logistic_regression": np.concatenate(pred_lr) if pred_lr else empty,
        "pca_knn": np.concatenate(pred_knn) if pred_knn else empty,
    }
    z_test = np.concatenate(z_parts) if z_parts else np.zeros((0, z_train.shape[1]), dtype=np.float32)
    return {"y_true": y, "genes": genes, "z_test": z_test, "predictions": predictions,
            "n_train_used": int(len(y_train))}
