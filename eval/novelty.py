"""The novelty check: is a cell's transcriptome unlike every training cell's?

A softmax over the known cell types cannot say "none of these", and the cell embedding cannot either: the cell
tower is trained to pull cells towards the *training* types' texts, so a type it never saw lands among a known
one (on the demo the held-out hematopoietic precursors embed among dendritic cells, and the cosine to the nearest
training cell in the embedding separates them from seen-type cells with AUROC 0.88). The expression profile
itself still shows them unlike any training cell (AUROC 0.99 on the same cells; BENCHMARKS.md, "Which space the
novelty check looks in"), as scmap's "unassigned" call (Kiselev et al. 2018) uses it. So the check is model-free:

* each cell's **profile** is log1p CP10k (totals over the genes of the model's panel the cell's file has) on
  the training split's :data:`NOVELTY_GENES` most variable genes (:func:`scmm.data_pipeline.hvg.hvg_panel`,
  Seurat flavour);
* a PCA (:data:`NOVELTY_COMPONENTS` components) fitted on the training cells' profiles maps it to a point, which
  is L2-normalised;
* the cell's **novelty similarity** is the mean cosine similarity of that point to its :data:`NOVELTY_K` nearest
  **reference** points: the training cells (at most :data:`NOVELTY_MAX_REFERENCE`, a seeded subsample beyond),
  searched exactly by FAISS inner product. Low similarity = novel. The mean over a few neighbours is steadier than
  the single nearest one against a lone odd training cell.

:class:`ExpressionNovelty` holds the genes (as vocabulary ids), the PCA and the reference; ``scmm eval`` fits it
(:func:`fit_novelty`) and writes it to :data:`NOVELTY_FILE` beside ``metrics.json``, ``scmm package`` copies it
into the model and ``scmm annotate`` reads the profiles of the user's cells chunk by chunk
(:meth:`ExpressionNovelty.profiles`). Where the threshold comes from (the val split) and how it combines with the
confidence is :mod:`scmm.eval.calibration`'s. A gene of the reference that the user's file lacks counts as not
detected; the profile's totals are over the genes the file has, so a file missing some of the panel still gives
comparable profiles.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

from scmm.data_pipeline.collate import CP10K, log1p_normalize
from scmm.data_pipeline.hvg import hvg_panel, iter_log1p_profiles, log1p_profiles
from scmm.data_pipeline.store import Corpus
from scmm.eval import knn
from scmm.model.folders import NOVELTY_FILE

__all__ = ["ExpressionNovelty", "fit_novelty", "split_similarity", "NOVELTY_FILE", "NOVELTY_GENES",
           "NOVELTY_COMPONENTS", "NOVELTY_K", "NOVELTY_MAX_REFERENCE"]

NOVELTY_GENES = 2000
NOVELTY_COMPONENTS = 50
NOVELTY_K = 5
NOVELTY_MAX_REFERENCE = 50_000
_ARRAYS = ("vocab_ids", "mean", "components", "reference")


@dataclass(frozen=True)
class ExpressionNovelty:
    """The novelty check's genes, PCA and reference (module docstring)."""

    vocab_ids: np.ndarray  # int64 [G]: the genes of the profile, as model vocabulary ids
    mean: np.ndarray  # float32 [G]: the PCA's centre
    components: np.ndarray  # float32 [P, G]
    reference: np.ndarray  # float16 [n, P]: the reference cells' L2-normalised PCA points
    k: int = NOVELTY_K
    n_train_cells: int = 0  # the training split's size (the reference is all of it, or a subsample)

    def __post_init__(self) -> None:
        g, p = len(self.vocab_ids), len(self.components)
        if (self.vocab_ids.ndim != 1 or self.mean.shape != (g,) or self.components.shape != (p, g)
                or self.reference.ndim != 2 or self.reference.shape[1] != p or len(self.reference) == 0
                or self.k < 1):
            raise ValueError(f"inconsistent novelty reference: {g} genes, mean {self.mean.shape}, components "
                             f"{self.components.shape}, reference {self.reference.shape}, k {self.k}")
        if not all(np.isfinite(a).all() for a in (self.mean, self.components, self.reference)):
            raise ValueError("the novelty reference holds non-finite values")

    # --- profiles and points ----------------------------------------------------------------------
    def profiles(self, block: sp.spmatrix, vocab_ids: np.ndarray) -> np.ndarray:
        """log1p CP10k profiles [n, G] of a block of linear-scale values whose columns are the genes
        ``vocab_ids`` (the model's panel genes the file has); the totals are over those columns."""
        x = log1p_normalize(block, "counts", CP10K)
        pos = {int(v): i for i, v in enumerate(np.asarray(vocab_ids))}
        have = np.array([v in pos for v in self.vocab_ids.tolist()], dtype=bool)
        out = np.zeros((x.shape[0], len(self.vocab_ids)), dtype=np.float32)
        if have.any():
            cols = np.array([pos[int(v)] for v in self.vocab_ids[have]], dtype=np.int64)
            out[:, have] = x[:, cols].toarray()
        return out

    def points(self, x: np.ndarray) -> np.ndarray:
        """L2-normalised PCA points [n, P] of profiles ``x`` [n, G] (float32)."""
        return _points(x, self.mean, self.components)

    def index(self):
        """The exact inner-product index over the reference points (build once, search per chunk)."""
        return knn.build_index(knn.l2_normalise(self.reference.astype(np.float32)), "ip")

    def similarity(self, x: np.ndarray, index=None) -> np.ndarray:
        """Per cell (profiles ``x`` [n, G]): the mean cosine similarity to its ``k`` nearest reference cells."""
        if len(x) == 0:
            return np.zeros(0)
        scores, _ = knn.knn_search(self.index() if index is None else index, self.points(x),
                                   min(self.k, len(self.reference)))
        return scores.mean(axis=1).astype(np.float64)

    # --- storage ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The ``.npz`` file's bytes (what :data:`NOVELTY_FILE` holds)."""
        buf = io.BytesIO()
        np.savez(buf, vocab_ids=self.vocab_ids.astype(np.int64), mean=self.mean.astype(np.float32),
                 components=self.components.astype(np.float32), reference=self.reference.astype(np.float16),
                 k=np.int64(self.k), n_train_cells=np.int64(self.n_train_cells))
        return buf.getvalue()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ExpressionNovelty:
        """From the arrays of a :data:`NOVELTY_FILE` (``ValueError`` when one is missing or they disagree)."""
        missing = [k for k in (*_ARRAYS, "k") if k not in arrays]
        if missing:
            raise ValueError(f"the novelty reference lacks {', '.join(missing)}")
        return cls(vocab_ids=np.asarray(arrays["vocab_ids"], dtype=np.int64),
                   mean=np.asarray(arrays["mean"], dtype=np.float32),
                   components=np.asarray(arrays["components"], dtype=np.float32),
                   reference=np.asarray(arrays["reference"], dtype=np.float16),
                   k=int(arrays["k"]), n_train_cells=int(arrays.get("n_train_cells", 0)))

    def describe(self) -> dict:
        """What ``annotation.calibration.novelty_reference`` records (the file's sha256 included)."""
        return {"file": NOVELTY_FILE, "space": "expression", "n_cells": int(len(self.reference)),
                "n_train_cells": int(self.n_train_cells), "n_genes": int(len(self.vocab_ids)),
                "n_components": int(len(self.components)), "k": int(self.k), "sha256": self.sha256()}


def _points(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, dtype=np.float32) - mean) @ components.T
    return knn.l2_normalise(z.astype(np.float32))


def fit_novelty(corpus: Corpus, seed: int = 0, n_genes: int = NOVELTY_GENES,
                n_components: int = NOVELTY_COMPONENTS, k: int = NOVELTY_K,
                max_cells: int = NOVELTY_MAX_REFERENCE, genes: np.ndarray | None = None) -> ExpressionNovelty | None:
    """The novelty check fitted on the corpus's train split (module docstring); None without 2 train cells.
    ``genes``: the panel when the caller already chose it (``hvg_panel(corpus, n_genes, "train")``)."""
    n_train = int(corpus.manifest["splits"].get("train", 0))
    if n_train < 2:
        return None
    genes = hvg_panel(corpus, n_genes, "train") if genes is None else np.asarray(genes, dtype=np.int64)
    x, _, _ = log1p_profiles(corpus, "train", genes, max_cells=max_cells, seed=seed)
    pca = PCA(n_components=min(n_components, len(x) - 1, len(genes)), svd_solver="randomized",
              random_state=seed).fit(x)
    mean, components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
    return ExpressionNovelty(vocab_ids=np.asarray(corpus.gene_vocab_ids, dtype=np.int64)[genes], mean=mean,
                             components=components, reference=_points(x, mean, components).astype(np.float16),
                             k=k, n_train_cells=n_train)


def split_similarity(novelty: ExpressionNovelty, corpus: Corpus, split: str) -> tuple[np.ndarray, list[str]]:
    """(novelty similarity, cell IDs) of a corpus split's cells in shard order, read shard by shard."""
    pos = {int(v): i for i, v in enumerate(np.asarray(corpus.gene_vocab_ids))}
    genes = np.array([pos[int(v)] for v in novelty.vocab_ids], dtype=np.int64)
    index = novelty.index()
    sims, ids = [np.zeros(0)], []
    for x, cell_ids, _ in iter_log1p_profiles(corpus, split, genes):
        sims.append(novelty.similarity(x, index))
        ids += [str(c) for c in cell_ids]
    return np.concatenate(sims), ids
