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
* a PCA (:data:`NOVELTY_COMPONENTS` components) fitted on (half of) the training cells' profiles maps it to a
  point, which is L2-normalised;
* the cell's **novelty similarity** is the mean cosine similarity of that point to its :data:`NOVELTY_K` nearest
  **reference** points: the training cells (at most :data:`NOVELTY_MAX_REFERENCE`, a seeded subsample beyond),
  searched exactly by FAISS inner product. Low similarity = novel. The mean over a few neighbours is steadier than
  the single nearest one against a lone odd training cell.

:class:`ExpressionNovelty` holds the genes (as vocabulary ids), the PCA and the reference; ``scmm eval`` fits it
(:func:`fit_novelty`) and writes it to :data:`NOVELTY_FILE` beside ``metrics.json``, ``scmm package`` copies it
into the model and ``scmm annotate`` reads the profiles of the user's cells chunk by chunk
(:meth:`ExpressionNovelty.profiles`). A gene of the reference that the user's file lacks counts as not detected;
the profile's totals are over the genes the file has, so a file missing some of the panel still gives comparable
profiles. How the threshold combines with the confidence is :mod:`scmm.eval.calibration`'s.

**Calibration** (:func:`calibrated_novelty`): the check is model-free, so its threshold is calibrated on the
training cells themselves rather than on the few val cells. The training cells' groups are their donors (their
datasets without donors, the cells themselves without either; :data:`CALIBRATION_GROUPS`); the PCA is fitted on a
seeded half of the groups, and every cell of the other half scores its similarity to the other reference cells,
its own group left out (:func:`leave_group_out_similarity`), which is how a cell of a new donor meets the
reference: a PCA that never saw it, a reference without its donor. Why not every training cell: a PCA fitted on a
cell flatters nothing but its own noise, so a cell it was fitted on lies *farther* from the others in the PCA
space than a new cell does; in a simulation (30 genes, 10 components, 12 donors of 30 cells; tests/
test_calibration.py) new donors' cells fell below the 5 % cut of in-sample leave-donor-out values 0.5 % of the
time, and below that of the half the PCA never saw 4.3 % of the time. On the demo corpus (no donors: 274
leave-self-out values) the val cells fell below the 2.5 % cut 2.9 % of the time (2 of 69), against 0 with the
cut at the smallest val value.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
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

__all__ = ["ExpressionNovelty", "NoveltyCalibration", "fit_novelty", "calibrated_novelty",
           "leave_group_out_similarity", "split_similarity", "NOVELTY_FILE", "NOVELTY_GENES",
           "NOVELTY_COMPONENTS", "NOVELTY_K", "NOVELTY_MAX_REFERENCE"]

NOVELTY_GENES = 2000
NOVELTY_COMPONENTS = 50
NOVELTY_K = 5
NOVELTY_MAX_REFERENCE = 50_000
CALIBRATION_GROUPS = ("donor_id", "dataset_id")  # what a calibration value leaves out, first that applies
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


def _fit(corpus: Corpus, seed: int, n_genes: int, n_components: int, k: int, max_cells: int,
         genes: np.ndarray | None) -> tuple[ExpressionNovelty, np.ndarray, list[str], np.ndarray, str, np.ndarray
                                           ] | None:
    """(the check, the reference cells' float32 points, their cell IDs, their groups, what the groups are, the
    PCA-fit mask); None without 2 train cells. The PCA is fitted on half of the groups (module docstring)."""
    n_train = int(corpus.manifest["splits"].get("train", 0))
    if n_train < 2:
        return None
    genes = hvg_panel(corpus, n_genes, "train") if genes is None else np.asarray(genes, dtype=np.int64)
    x, ids, _ = log1p_profiles(corpus, "train", genes, max_cells=max_cells, seed=seed)
    groups, left_out = _calibration_groups(corpus, ids)
    fit = _pca_half(groups, seed)
    pca = PCA(n_components=min(n_components, int(fit.sum()) - 1, len(genes)), svd_solver="randomized",
              random_state=seed).fit(x[fit])
    mean, components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
    points = _points(x, mean, components)
    novelty = ExpressionNovelty(vocab_ids=np.asarray(corpus.gene_vocab_ids, dtype=np.int64)[genes], mean=mean,
                                components=components, reference=points.astype(np.float16), k=k,
                                n_train_cells=n_train)
    return novelty, points, ids, groups, left_out, fit


def _pca_half(groups: np.ndarray, seed: int) -> np.ndarray:
    """The cells whose groups fit the PCA: a seeded half of the groups (the larger half); every cell when there
    are fewer than 4 cells or 2 groups (the calibration is then in-sample)."""
    names, codes = np.unique(groups, return_inverse=True)
    if len(groups) < 4 or len(names) < 2:
        return np.ones(len(groups), dtype=bool)
    order = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 27])).permutation(len(names))
    fit = np.zeros(len(names), dtype=bool)
    fit[order[:(len(names) + 1) // 2]] = True
    return fit[codes]


def fit_novelty(corpus: Corpus, seed: int = 0, n_genes: int = NOVELTY_GENES,
                n_components: int = NOVELTY_COMPONENTS, k: int = NOVELTY_K,
                max_cells: int = NOVELTY_MAX_REFERENCE, genes: np.ndarray | None = None) -> ExpressionNovelty | None:
    """The novelty check fitted on the corpus's train split (module docstring); None without 2 train cells.
    ``genes``: the panel when the caller already chose it (``hvg_panel(corpus, n_genes, "train")``)."""
    fitted = _fit(corpus, seed, n_genes, n_components, k, max_cells, genes)
    return None if fitted is None else fitted[0]


# --- calibration on the training cells themselves ----------------------------------------------------
@dataclass(frozen=True)
class NoveltyCalibration:
    """The calibration set of the novelty threshold (module docstring, "Calibration"): the similarity of each
    reference cell the PCA was not fitted on to the *other* reference cells, its own group (``left_out``) left
    out."""

    values: np.ndarray  # float64 [m]: one leave-group-out similarity per calibration cell
    cells: np.ndarray  # int64 [m]: the calibration cells, as rows of the reference
    left_out: str  # "donor_id", "dataset_id" or "cell": the group each value leaves out
    n_groups: int
    n_pca_cells: int  # reference cells the PCA was fitted on (the others are the calibration cells)

    def describe(self) -> dict:
        """What ``annotation.calibration.novelty_calibration`` records."""
        return {"split": "train", "left_out": self.left_out, "n_cells": int(len(self.values)),
                "n_groups": int(self.n_groups), "n_pca_cells": int(self.n_pca_cells)}


def leave_group_out_similarity(points: np.ndarray, reference: np.ndarray, groups: Sequence,
                               k: int = NOVELTY_K, queries: np.ndarray | None = None,
                               block: int = 1024) -> np.ndarray:
    """Per query cell ``i`` (rows ``queries``, default all): the mean cosine similarity of ``points[i]`` to its
    ``k`` nearest ``reference`` points among the cells of *other* groups (fewer when fewer remain), searched
    exactly (blocks of rows).

    ``points``: the cells' L2-normalised PCA points [n, P] (as a new cell's are computed); ``reference``: the
    stored reference rows of the same cells [n, P] (L2-normalised again here, as :meth:`ExpressionNovelty.index`
    does); ``groups``: one label per cell (donor, dataset, or the cell itself). ``ValueError`` when one group
    holds every cell (nothing left to compare with)."""
    q = np.asarray(points, dtype=np.float32)
    ref = knn.l2_normalise(np.asarray(reference, dtype=np.float32))
    codes, sizes = np.unique(np.asarray(list(groups), dtype=object).astype(str), return_inverse=True,
                             return_counts=True)[1:]
    n = len(q)
    if ref.shape != q.shape or len(codes) != n:
        raise ValueError(f"{n} points, reference {ref.shape}, {len(codes)} group labels: they must agree")
    rows_all = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    if len(rows_all) == 0:
        return np.zeros(0)
    others = n - sizes[codes]
    if others[rows_all].min() < 1:
        raise ValueError("one group holds every cell: no other cell to compare with")
    kk = int(min(k, others[rows_all].max()))
    out = np.zeros(len(rows_all), dtype=np.float64)
    for a in range(0, len(rows_all), block):
        rows = rows_all[a:a + block]
        s = (q[rows] @ ref.T).astype(np.float64)
        s[codes[rows, None] == codes[None, :]] = -np.inf
        top = -np.partition(-s, kk - 1, axis=1)[:, :kk]  # the kk largest, in no order
        top = np.sort(top, axis=1)[:, ::-1]
        take = np.minimum(others[rows], k)
        mask = np.arange(kk)[None, :] < take[:, None]
        out[a:a + len(rows)] = np.where(mask, top, 0.0).sum(1) / take
    return out


def _calibration_groups(corpus: Corpus, ids: list[str]) -> tuple[np.ndarray, str]:
    """(one group label per reference cell, what it is): the corpus's split grouping (donor, else dataset) when
    the reference cells span at least two such groups, else the next level down, else each cell itself."""
    wanted = [c for c in (corpus.manifest.get("split_group_by"), *CALIBRATION_GROUPS) if c in CALIBRATION_GROUPS]
    pos = {c: i for i, c in enumerate(ids)}
    for column in dict.fromkeys(wanted):
        if any(column not in entry.get("columns", ()) for entry in corpus.shards("train")):
            continue  # the corpus has no such column
        labels = [""] * len(ids)
        for shard in corpus.iter_shards("train", columns=("cell_id", column)):
            for cell, value in zip(shard.obs["cell_id"], shard.obs[column]):
                i = pos.get(str(cell))
                if i is not None:
                    labels[i] = "" if value is None else str(value)
        labels = [v if v not in ("nan", "None") else "" for v in labels]
        if len(set(labels) - {""}) >= 2:  # a cell without a value is a group of its own
            return np.array([v if v else f"<no {column}> {c}" for v, c in zip(labels, ids)], dtype=object), column
    return np.array(ids, dtype=object), "cell"


def calibrated_novelty(corpus: Corpus, seed: int = 0, n_genes: int = NOVELTY_GENES,
                       n_components: int = NOVELTY_COMPONENTS, k: int = NOVELTY_K,
                       max_cells: int = NOVELTY_MAX_REFERENCE, genes: np.ndarray | None = None
                       ) -> tuple[ExpressionNovelty, NoveltyCalibration] | None:
    """:func:`fit_novelty` and its calibration set: the leave-donor-out similarity of every reference (train) cell
    the PCA was not fitted on (:func:`leave_group_out_similarity`; leave-dataset-out without donors, leave-self-out
    without either). None without 2 train cells."""
    fitted = _fit(corpus, seed, n_genes, n_components, k, max_cells, genes)
    if fitted is None:
        return None
    novelty, points, _, groups, left_out, fit = fitted
    cells = np.flatnonzero(~fit) if (~fit).any() else np.arange(len(fit))
    values = leave_group_out_similarity(points, novelty.reference, groups, novelty.k, queries=cells)
    return novelty, NoveltyCalibration(values=values, cells=cells, left_out=left_out,
                                       n_groups=len(set(groups.tolist())), n_pca_cells=int(fit.sum()))


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
