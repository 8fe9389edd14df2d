"""Pseudo-cell k-NN accuracy in two spaces, with a random baseline and a class-mean reference.

Pseudo-cells are given as log1p CP10k expression over a gene panel ``genes`` (corpus gene indices, usually
:func:`scmm.data_pipeline.hvg.hvg_panel`), each with the cell type (CL ID / corpus label key) whose text generated
it. :func:`pseudocell_report` scores them against **real held-out cells** (the val and test splits), in:

* ``expression_pca``: log1p CP10k of the panel genes (per-cell totals over the whole corpus panel, as the
  loader computes them), reduced by PCA(``n_components``; centred, not scaled) fitted on the train split (a
  seeded subsample of at most ``PCA_MAX_TRAIN_CELLS`` cells); Euclidean distance.
* ``stage1_embedding`` (only with ``aligner``, a stage-1 :class:`~scmm.model.aligner.CellTextAligner`): the
  aligned cell embedding, cosine similarity. A pseudo-cell goes through the cell tower as a real cell holding
  those values would (:func:`embed_profiles`): its panel genes with a value > 0 are the expressed genes, the
  values are already log1p CP10k so they are not renormalised, then the model's own encoding applies
  (:func:`scmm.data_pipeline.encoding.encode_cells` at inference). Genes outside the panel are absent.
  **Decision (fairness)**: the reference cells are restricted to the same panel and encoded by the same
  function (their log1p CP10k on whole-panel totals, sliced to the panel), so pseudo-cells and real cells are
  seen through the same genes; a pseudo-cell is then not penalised just for lacking the genes outside the
  panel. With ``restrict_reference=False`` the reference cells are embedded from every gene with
  :func:`scmm.eval.annotate.embed_split` instead. When the panel is the whole corpus panel both give the same
  embeddings in continuous mode.

Scoring (:func:`scmm.eval.knn.pseudocell_knn_accuracy`): each pseudo-cell of type ``t`` takes its ``k`` nearest
reference cells (FAISS, exact) and hits when their majority label is ``t``. A type with fewer than ``k``
reference cells cannot win a majority and is left out of the accuracy and listed in ``excluded_types``.
``random_baseline`` = 1 / number of types scored. The issue asks for at least ``MIN_PER_TYPE`` (20)
pseudo-cells per type; fewer is allowed but noted in ``notes``.

**Class-mean reference**: for each generated type with train cells, as many profiles as there are pseudo-cells
of that type, drawn gene by gene from the type's train statistics (:func:`type_moments`, streamed) the way
scmm's decoder draws a pseudo-cell: the gene is detected with the share of the type's train cells that detect
it, and a detected gene takes the type's mean detected log1p value + Gaussian noise of its standard deviation
(ddof 1), clipped at 0. **Decision**: the reference is sparse like real cells (earlier versions drew the
overall mean + noise, a dense profile that the stage-1 embedding space misplaces). Drawn with
``numpy.random.default_rng(seed)`` type by type in sorted order, so it is deterministic for a seed; scored
exactly like the pseudo-cells in each space.
Types without train cells get no class-mean profiles (``class_mean_missing_types``).

**Real-cell reference** (:func:`real_cell_sample`): as many *real* train cells of each generated type as there
are pseudo-cells of it (a seeded uniform sample per type, streamed shard by shard), scored exactly like the
pseudo-cells in each space: ``real_cells_reference``. It says how well a cell that *is* of the type scores, so
a pseudo-cell accuracy near it means the pseudo-cells are as recognisable as real cells, and one far above it
means they are cleaner than real cells (dense means are: 0.94 in PCA space on the demo, where real cells score
0.76).

Output (DESIGN.md ``pseudocell``): ``knn_accuracy``, ``k``, ``space`` (``"expression_pca"``),
``random_baseline``, ``class_mean_reference`` and ``real_cells_reference`` of the PCA space at the top level, plus
``spaces`` = ``{name: {knn_accuracy, class_mean_reference, real_cells_reference, random_baseline, per_type,
excluded_types, n_scored,
n_types_scored, metric}}``, ``per_type[t] = {accuracy, class_mean_accuracy, n, n_reference}``, and how sparse
the pseudo-cells are (:func:`zero_fractions`): ``zero_fraction_ratio`` (pseudo-cells' share of zero panel genes
over the reference cells' of their type, averaged over types) and ``zero_fraction[t] = {pseudo, real, ratio}``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA

from scmm.data_pipeline.encoding import cell_rng, encode_cells
from scmm.data_pipeline.hvg import iter_log1p_profiles, log1p_profiles
from scmm.data_pipeline.store import Corpus
from scmm.eval.annotate import embed_split
from scmm.eval.knn import pseudocell_knn_accuracy

__all__ = ["pseudocell_report", "embed_profiles", "class_mean_profiles", "real_cell_sample", "type_moments",
           "TypeStats", "zero_fractions", "PCA_MAX_TRAIN_CELLS", "MIN_PER_TYPE", "REFERENCE_SPLITS"]

PCA_MAX_TRAIN_CELLS = 50_000
MIN_PER_TYPE = 20
REFERENCE_SPLITS = ("val", "test")
EMBED_BATCH = 64


@dataclass
class TypeStats:
    """Per-gene statistics of one type's log1p profiles [G]: over all values (``mean``, ``std``, ddof 1, 0 for a
    single cell) and over the detected (> 0) values (``detected``: the share of cells with the gene detected,
    ``detected_mean``, ``detected_std``, ddof 1, 0 with fewer than two detections)."""

    n: int
    mean: np.ndarray
    std: np.ndarray
    detected: np.ndarray
    detected_mean: np.ndarray
    detected_std: np.ndarray


def _mean_std(n: np.ndarray | int, total: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(n, dtype=np.float64)
    mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
    var = np.divide(np.maximum(squares - n * mean ** 2, 0.0), n - 1, out=np.zeros_like(total), where=n > 1)
    return mean, np.sqrt(var)


def type_moments(corpus: Corpus, genes: np.ndarray, split: str = "train") -> dict[str, TypeStats]:
    """{type: :class:`TypeStats`} of the log1p profiles of ``split``, streamed by shard."""
    sums: dict[str, list] = {}
    for x, _, labels in iter_log1p_profiles(corpus, split, genes):
        lab = np.asarray(labels)
        x = x.astype(np.float64)
        for t in np.unique(lab):
            rows = x[lab == t]
            acc = sums.setdefault(str(t), [0] + [np.zeros(x.shape[1]) for _ in range(3)])
            acc[0] += len(rows)
            acc[1] += rows.sum(0)
            acc[2] += (rows * rows).sum(0)
            acc[3] += (rows > 0).sum(0)
    out = {}
    for t, (n, total, squares, n_detected) in sums.items():
        mean, std = _mean_std(n, total, squares)
        detected_mean, detected_std = _mean_std(n_detected, total, squares)  # zeros add nothing to either sum
        out[t] = TypeStats(n, mean, std, n_detected / n, detected_mean, detected_std)
    return out


def class_mean_profiles(moments: dict[str, TypeStats], counts: dict[str, int],
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(profiles float32 [sum n, G], labels, types without moments): per gene, detected with the type's detection
    rate, then the type's detected mean + N(0, detected std) noise, clipped at 0 (the module docstring)."""
    rng = np.random.default_rng(seed)
    parts, labels, missing = [], [], []
    n_genes = len(next(iter(moments.values())).mean) if moments else 0
    for t in sorted(counts):
        if t not in moments:
            missing.append(t)
            continue
        m = moments[t]
        n = int(counts[t])
        value = np.maximum(m.detected_mean[None, :] + rng.standard_normal((n, n_genes)) * m.detected_std[None, :], 0)
        parts.append(np.where(rng.random((n, n_genes)) < m.detected[None, :], value, 0.0))
        labels += [t] * n
    x = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, n_genes), dtype=np.float32)
    return x, np.asarray(labels, dtype=object), missing


def embed_profiles(aligner, x: np.ndarray, genes: np.ndarray, gene_vocab_ids: np.ndarray, seed: int = 0,
                   batch_size: int = EMBED_BATCH) -> np.ndarray:
    """Aligned cell embeddings [n, D] of log1p CP10k profiles ``x`` [n, len(genes)] (module docstring).

    Each row is encoded by :func:`~scmm.data_pipeline.encoding.encode_cells` with the model's encoding at inference,
    the values taken as already normalised; its draws (binning ties, a length sample) are seeded by ``seed`` and the
    row. Cells are batched by number of expressed genes so that little is computed on padding.
    """
    genes = np.asarray(genes, dtype=np.int64)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(genes):
        raise ValueError(f"profiles must be [n, {len(genes)}] over the panel genes, got shape {x.shape}")
    cells = sp.csr_matrix(np.where(x > 0, x, 0.0))
    vocab_ids = np.asarray(gene_vocab_ids, dtype=np.int64)[genes]
    aligner.eval()
    out = np.zeros((len(x), aligner.heads.cell_proj.out_features), dtype=np.float32)
    order = np.argsort(np.diff(cells.indptr), kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = encode_cells(cells[rows], vocab_ids, aligner.vocab, aligner.encoding, normalization="log1p",
                                 training=False, rng=[cell_rng(seed, r) for r in rows])
            out[rows] = aligner.cell_features(**batch).float().numpy()
    return out


def _fit_pca(corpus: Corpus, genes: np.ndarray, n_components: int, seed: int) -> PCA:
    x, _, _ = log1p_profiles(corpus, "train", genes, max_cells=PCA_MAX_TRAIN_CELLS, seed=seed)
    if len(x) < 2:
        raise ValueError(f"the PCA space needs at least 2 train cells, corpus {corpus.path} has {len(x)}")
    k = max(1, min(n_components, x.shape[0] - 1, x.shape[1]))
    return PCA(n_components=k, random_state=seed).fit(x)


def _score_space(gen_x, gen_labels, cm_x, cm_labels, ref_x, ref_labels, k: int, metric: str) -> dict[str, Any]:
    main = pseudocell_knn_accuracy(gen_x, gen_labels, ref_x, ref_labels, k=k, metric=metric)
    cm = pseudocell_knn_accuracy(cm_x, cm_labels, ref_x, ref_labels, k=k, metric=metric) if len(cm_x) else None
    per_type = {}
    for t, row in main["per_type"].items():
        row = dict(row)
        cm_row = (cm or {}).get("per_type", {}).get(t)
        row["class_mean_accuracy"] = None if cm_row is None else cm_row["accuracy"]
        per_type[t] = row
    cm_acc = None if cm is None or not cm["n_scored"] else cm["knn_accuracy"]
    return {"knn_accuracy": main["knn_accuracy"], "class_mean_reference": cm_acc,
            "random_baseline": main["random_baseline"], "per_type": per_type,
            "excluded_types": main["excluded_types"], "n_scored": main["n_scored"],
            "n_types_scored": main["n_types_scored"], "metric": metric}


def _check_pseudocells(pseudo_x: np.ndarray, pseudo_labels: Sequence,
                       genes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(genes int64, pseudo-cells float32 [n, len(genes)], labels str); ``ValueError`` on bad shapes or values."""
    genes = np.asarray(genes, dtype=np.int64)
    gen_x = np.asarray(pseudo_x, dtype=np.float32)
    gen_labels = np.asarray(pseudo_labels).astype(str)
    if gen_x.ndim != 2 or gen_x.shape[1] != len(genes):
        raise ValueError(f"pseudo_x must be [n, {len(genes)}] (one column per panel gene), got shape {gen_x.shape}")
    if len(gen_labels) != len(gen_x) or len(gen_x) == 0:
        raise ValueError(f"need one label per pseudo-cell and at least one pseudo-cell "
                         f"({len(gen_labels)} labels, {len(gen_x)} cells)")
    if not np.all(np.isfinite(gen_x)):
        raise ValueError("pseudo_x holds non-finite values")
    return genes, gen_x, gen_labels


def _present_splits(corpus: Corpus, reference_splits: Sequence[str]) -> list[str]:
    """The reference splits that hold cells; ``ValueError`` when none does."""
    ref_splits = [s for s in reference_splits if corpus.manifest["splits"].get(s, 0) > 0]
    if not ref_splits:
        raise ValueError(f"corpus {corpus.path} has no {' or '.join(reference_splits)} cells to use as the reference")
    return ref_splits


def _type_counts(gen_labels: np.ndarray) -> tuple[dict[str, int], list[str]]:
    """({type: pseudo-cells}, notes): a note lists the types with fewer than ``MIN_PER_TYPE`` pseudo-cells."""
    types, type_counts = np.unique(gen_labels, return_counts=True)
    counts = dict(zip(types.tolist(), type_counts.astype(int).tolist()))
    notes = []
    few = {t: n for t, n in counts.items() if n < MIN_PER_TYPE}
    if few:
        notes.append(f"{len(few)} type(s) have fewer than {MIN_PER_TYPE} pseudo-cells: "
                     + ", ".join(f"{t} ({n})" for t, n in sorted(few.items())))
    return counts, notes


def _reference_cells(corpus: Corpus, splits: Sequence[str], genes: np.ndarray, pca: PCA, aligner,
                     seed: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[str], np.ndarray]:
    """(PCA coordinates, panel embeddings or None without ``aligner``, labels, cell ids, each cell's share of zero
    panel genes) of the reference cells.

    Streamed shard by shard over the panel ``genes``; embeddings are those of :func:`embed_profiles`.
    """
    ref_pca, ref_emb, ref_labels, ref_ids, zeros = [], [], [], [], []
    for split in splits:
        for x, cell_ids, labels in iter_log1p_profiles(corpus, split, genes):
            ref_ids += cell_ids
            zeros.append((x <= 0).mean(1))
            ref_pca.append(pca.transform(x).astype(np.float32))
            if aligner is not None:
                ref_emb.append(embed_profiles(aligner, x, genes, corpus.gene_vocab_ids, seed))
            ref_labels += labels
    emb = np.concatenate(ref_emb) if aligner is not None else None
    return np.concatenate(ref_pca), emb, np.asarray(ref_labels), ref_ids, np.concatenate(zeros)


def _reference_embeddings_all_genes(aligner, corpus: Corpus, splits: Sequence[str], ref_ids: list[str]) -> np.ndarray:
    """Embeddings of the reference cells from every gene (:func:`embed_split`), in the order of ``ref_ids``."""
    parts, ids = [], []
    for split in splits:
        emb = embed_split(aligner, corpus, split, progress=False)
        parts.append(emb.embeddings)
        ids += emb.cell_ids
    pos = {c: i for i, c in enumerate(ids)}
    return np.concatenate(parts)[[pos[c] for c in ref_ids]]  # into shard order, with the label keys


def zero_fractions(gen_x: np.ndarray, gen_labels: np.ndarray, ref_zero: np.ndarray,
                   ref_labels: np.ndarray) -> dict[str, Any]:
    """How sparse the pseudo-cells are against real cells of their type: per type the mean share of zero panel
    genes of its pseudo-cells and of its reference cells, and their ratio; ``ratio`` = the ratio averaged over the
    types that have reference cells (1 = as sparse as real cells)."""
    gen_zero = (gen_x <= 0).mean(1)
    per_type = {}
    for t in sorted(set(gen_labels.tolist())):
        real = ref_zero[ref_labels == t]
        if len(real) == 0 or real.mean() == 0:
            continue
        pseudo = float(gen_zero[gen_labels == t].mean())
        per_type[t] = {"pseudo": pseudo, "real": float(real.mean()), "ratio": pseudo / float(real.mean())}
    ratio = float(np.mean([row["ratio"] for row in per_type.values()])) if per_type else None
    return {"ratio": ratio, "per_type": per_type}


def real_cell_sample(corpus: Corpus, genes: np.ndarray, counts: Mapping[str, int], seed: int = 0,
                     split: str = "train") -> tuple[np.ndarray, list[str]]:
    """(X [n, len(genes)] log1p CP10k, label keys): ``counts[t]`` real cells of each type ``t`` of ``split`` (all of
    them when it has fewer), a seeded uniform sample per type (reservoir sampling, one shard in memory), in sorted
    type order."""
    rng = np.random.default_rng(seed)
    keep: dict[str, list[np.ndarray]] = {t: [] for t in counts}
    seen: dict[str, int] = dict.fromkeys(counts, 0)
    for x, _, labels in iter_log1p_profiles(corpus, split, genes):
        for row, t in zip(x, labels):
            if t not in keep or counts[t] <= 0:
                continue
            seen[t] += 1
            if len(keep[t]) < counts[t]:
                keep[t].append(row.copy())
            else:
                j = int(rng.integers(seen[t]))
                if j < counts[t]:
                    keep[t][j] = row.copy()
    types = [t for t in sorted(keep) if keep[t]]
    if not types:
        return np.zeros((0, len(genes)), dtype=np.float32), []
    return (np.stack([r for t in types for r in keep[t]]).astype(np.float32),
            [t for t in types for _ in keep[t]])


def _score_pca_space(pca: PCA, gen_x, gen_labels, cm_x, cm_labels, ref_z, ref_labels, k: int,
                     ref_splits: Sequence[str]) -> dict[str, Any]:
    """The ``expression_pca`` space; ``ValueError`` when no generated type has ``k`` reference cells."""
    space = _score_space(pca.transform(gen_x).astype(np.float32), gen_labels,
                         pca.transform(cm_x).astype(np.float32) if len(cm_x) else cm_x, cm_labels,
                         ref_z, ref_labels, k, "l2")
    if space["n_types_scored"] == 0:
        raise ValueError(f"no generated type has at least k={k} reference cells in the {'+'.join(ref_splits)} "
                         f"split(s): {space['excluded_types']}")
    return space


def _score_embedding_space(aligner, genes: np.ndarray, gene_vocab_ids: np.ndarray, gen_x, gen_labels, cm_x,
                           cm_labels, ref_e, ref_labels, k: int, seed: int) -> dict[str, Any]:
    """The ``stage1_embedding`` space: pseudo-cells and class-mean profiles embedded, cosine similarity."""
    gen_e = embed_profiles(aligner, gen_x, genes, gene_vocab_ids, seed)
    cm_e = embed_profiles(aligner, cm_x, genes, gene_vocab_ids, seed + 1) if len(cm_x) else cm_x
    return _score_space(gen_e, gen_labels, cm_e, cm_labels, ref_e, ref_labels, k, "ip")


def pseudocell_report(corpus: Corpus, pseudo_x: np.ndarray, pseudo_labels: Sequence, genes: np.ndarray, k: int = 5,
                      n_components: int = 50, seed: int = 0, aligner=None,
                      restrict_reference: bool = True,
                      reference_splits: Sequence[str] = REFERENCE_SPLITS,
                      extra: Mapping[str, tuple[np.ndarray, Sequence]] | None = None) -> dict[str, Any]:
    """Pseudo-cell k-NN accuracy per space with its random baseline and class-mean reference (module docstring).

    ``pseudo_x``: float [n, len(genes)] log1p CP10k over the panel ``genes`` (corpus gene indices);
    ``pseudo_labels``: the type (corpus label key, e.g. a CL ID) of the text each pseudo-cell was generated from.
    ``reference_splits``: the held-out splits whose cells are the reference (val alone when
    choosing hyper-parameters). Raises ``ValueError`` when no generated type has ``k`` reference cells.
    ``extra``: more pseudo-cell sets (name -> (x, labels)), scored against the same PCA and reference cells:
    ``extra[name][space]`` is their k-NN accuracy.
    """
    genes, gen_x, gen_labels = _check_pseudocells(pseudo_x, pseudo_labels, genes)
    ref_splits = _present_splits(corpus, reference_splits)
    counts, notes = _type_counts(gen_labels)
    cm_x, cm_labels, cm_missing = class_mean_profiles(type_moments(corpus, genes, "train"), counts, seed)
    if cm_missing:
        notes.append(f"no train cells (no class-mean profiles) for: {', '.join(cm_missing)}")

    real_x, real_labels = real_cell_sample(corpus, genes, counts, seed)
    pca = _fit_pca(corpus, genes, n_components, seed)
    ref_z, ref_e, ref_labels, ref_ids, ref_zero = _reference_cells(
        corpus, ref_splits, genes, pca, aligner if restrict_reference else None, seed)
    spaces = {"expression_pca": _score_pca_space(pca, gen_x, gen_labels, cm_x, cm_labels, ref_z, ref_labels, k,
                                                 ref_splits)}
    if aligner is not None:
        if not restrict_reference:
            ref_e = _reference_embeddings_all_genes(aligner, corpus, ref_splits, ref_ids)
        spaces["stage1_embedding"] = _score_embedding_space(aligner, genes, corpus.gene_vocab_ids, gen_x, gen_labels,
                                                            cm_x, cm_labels, ref_e, ref_labels, k, seed)

    def score(x: np.ndarray, labels: Sequence) -> dict[str, float]:
        """k-NN accuracy per space of another set of profiles, against the same PCA and reference cells."""
        _, ex, el = _check_pseudocells(x, labels, genes)
        out = {"expression_pca": pseudocell_knn_accuracy(pca.transform(ex).astype(np.float32), el, ref_z,
                                                         ref_labels, k=k, metric="l2")["knn_accuracy"]}
        if aligner is not None:
            emb = embed_profiles(aligner, ex, genes, corpus.gene_vocab_ids, seed)
            out["stage1_embedding"] = pseudocell_knn_accuracy(emb, el, ref_e, ref_labels, k=k,
                                                              metric="ip")["knn_accuracy"]
        return out

    scored = {name: score(x, labels) for name, (x, labels) in (extra or {}).items()}
    real = score(real_x, real_labels) if real_labels else {}
    for name, space in spaces.items():
        space["real_cells_reference"] = real.get(name, float("nan"))
    pca_space = spaces["expression_pca"]
    sparsity = zero_fractions(gen_x, gen_labels, ref_zero, ref_labels)
    return {"zero_fraction_ratio": sparsity["ratio"], "zero_fraction": sparsity["per_type"], "extra": scored,
            "knn_accuracy": pca_space["knn_accuracy"], "k": int(k), "space": "expression_pca",
            "random_baseline": pca_space["random_baseline"],
            "class_mean_reference": pca_space["class_mean_reference"],
            "real_cells_reference": pca_space["real_cells_reference"], "spaces": spaces,
            "n_per_type": counts, "n_reference": int(len(ref_labels)), "reference_splits": ref_splits,
            "n_genes": int(len(genes)), "n_components": int(pca.n_components_),
            "reference_genes": "panel" if restrict_reference else "all", "class_mean_missing_types": cm_missing,
            "notes": notes}
