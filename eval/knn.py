"""FAISS: the one place scmm builds and searches indexes; majority votes and the pseudo-cell k-NN accuracy.

:func:`build_index` gives an exact (flat) index, or, with ``approximate_above`` and at least that many rows, an
inverted-file index (``IndexIVFFlat``) with ``nlist = 4 * sqrt(N)`` lists (at most 65,536), trained on a seeded
sample of at most ``64 * nlist`` rows and searched with ``nprobe = min(nlist, 32)``. A GPU index is used when the
faiss build has GPU support and a GPU is visible (``hasattr(faiss, "StandardGpuResources") and
faiss.get_num_gpus() > 0``), the CPU index otherwise; both give the same neighbours up to floating-point ties.
:func:`to_cpu` brings an index back to be written.

Pseudo-cell k-NN accuracy (:func:`pseudocell_knn_accuracy`): the real reference cells are indexed; each
pseudo-cell generated from the text of type ``t`` takes its ``k`` nearest reference cells and scores a hit when
their majority label (ties: the label of the nearest tied neighbour) is ``t``. A generated type with fewer than
``k`` reference cells cannot win a vote outright and is left out of the accuracy and listed in
``excluded_types``. ``knn_accuracy`` is the fraction of hits over the pseudo-cells of the scored types and
``random_baseline`` is ``1 / number of scored types``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

__all__ = ["gpu_available", "build_index", "index_kind", "set_nprobe", "to_cpu", "to_gpu", "knn_search", "knn_vote",
           "pseudocell_knn_accuracy", "l2_normalise", "FLAT_MAX_CELLS"]

FLAT_MAX_CELLS = 200_000  # reference indexes (scmm index) are exact below this many cells, IVF from there on
MAX_NLIST = 65_536
NPROBE = 32
_GPU_RESOURCES: Any = None


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as contiguous float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def to_gpu(index: Any) -> Any:
    """The index on the GPU when faiss can use one, else unchanged."""
    global _GPU_RESOURCES
    if not gpu_available():
        return index
    if _GPU_RESOURCES is None:  # pragma: no cover - needs faiss-gpu and a GPU
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)  # pragma: no cover


def to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index (to write it); a CPU index unchanged."""
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:  # pragma: no cover
        return faiss.index_gpu_to_cpu(index)
    return index


def set_nprobe(index: Any, nprobe: int) -> None:
    """How many inverted lists an IVF index searches."""
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    except Exception:  # GPU indexes take the attribute directly
        index.nprobe = int(nprobe)


def index_kind(index: Any) -> dict:
    """``{"kind": "flat"}`` or ``{"kind": "ivf_flat", "nlist", "nprobe"}`` of an index from :func:`build_index`."""
    nlist = getattr(faiss.extract_index_ivf(index), "nlist", None) if "IVF" in type(to_cpu(index)).__name__ else None
    if nlist is None:
        return {"kind": "flat"}
    return {"kind": "ivf_flat", "nlist": int(nlist), "nprobe": int(min(nlist, NPROBE))}


def build_index(x: np.ndarray, metric: str = "ip", approximate_above: int | None = None, seed: int = 0) -> Any:
    """A FAISS index over the rows of ``x`` (float32 [N, D]); ``metric`` is ``'ip'`` or ``'l2'``. Exact, unless
    ``approximate_above`` is given and N reaches it (IVF; see the module docstring)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"index vectors must be 2-D [N, D], got shape {x.shape}")
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    n, d = x.shape
    flat = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    if approximate_above is None or n < approximate_above:
        index = to_gpu(flat)
        index.add(x)
        return index
    nlist = int(min(MAX_NLIST, max(1, round(4 * math.sqrt(n)))))
    kind = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    index = to_gpu(faiss.IndexIVFFlat(flat, d, nlist, kind))
    sample = x[np.sort(np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False))]
    index.train(sample)
    for start in range(0, n, 100_000):
        index.add(x[start:start + 100_000])
    set_nprobe(index, min(nlist, NPROBE))
    return index


def knn_search(index: Any, q: np.ndarray, k: int, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(scores [M, k] float32, ids [M, k] int64) of the ``k`` nearest rows for each query, searched in batches.

    For ``'ip'`` indexes larger scores are nearer, for ``'l2'`` smaller (squared distances). Missing
    neighbours (k larger than the index) have id -1.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"queries must be [M, {index.d}], got shape {q.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = np.empty((len(q), k), dtype=np.float32)
    ids = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), batch_size):
        d, i = index.search(q[start:start + batch_size], k)
        scores[start:start + batch_size], ids[start:start + batch_size] = d, i
    return scores, ids


def knn_vote(neighbour_labels: np.ndarray, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Majority label of each row of ``neighbour_labels`` [N, k] (columns ordered nearest first).

    Ties go to the tied label whose first occurrence is nearest. Integer labels below 0 mark missing
    neighbours and never vote (a row of only missing neighbours gets -1). Labels may be any comparable values
    (strings included); ``n_classes`` is only checked against integer labels. Returns (pred [N], confidence
    [N] = votes of the winner / number of valid neighbours).
    """
    lab = np.asarray(neighbour_labels)
    if lab.ndim != 2:
        raise ValueError(f"neighbour_labels must be [N, k], got shape {lab.shape}")
    n, k = lab.shape
    if lab.dtype.kind in "iu":
        codes = lab.astype(np.int64)
        if n_classes is not None and codes.size and codes.max() >= n_classes:
            raise ValueError(f"label {codes.max()} >= n_classes {n_classes}")
        values = None
    else:
        values, inverse = np.unique(lab.astype(str), return_inverse=True)
        codes = inverse.reshape(n, k).astype(np.int64)
    valid = codes >= 0
    # votes[i, j] = number of valid neighbours of row i that share the label at position j
    votes = ((codes[:, :, None] == codes[:, None, :]) & valid[:, None, :]).sum(axis=2)
    votes = np.where(valid, votes, 0)
    key = votes * (k + 1) - np.arange(k)[None, :]  # most votes, then nearest position
    best = np.argmax(key, axis=1) if k else np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    n_valid = valid.sum(axis=1)
    conf = np.where(n_valid > 0, votes[rows, best] / np.maximum(n_valid, 1), 0.0).astype(np.float32)
    pred_codes = np.where(n_valid > 0, codes[rows, best], -1) if k else np.full(n, -1)
    if values is None:
        return pred_codes, conf
    pred = np.asarray(values, dtype=object)[np.maximum(pred_codes, 0)]
    return pred, conf


def pseudocell_knn_accuracy(gen_x: np.ndarray, gen_labels: Sequence, ref_x: np.ndarray, ref_labels: Sequence,
                            k: int = 5, metric: str = "l2") -> dict[str, Any]:
    """k-NN accuracy of generated cells against real reference cells (see the module docstring).

    ``metric='l2'`` for expression PCA space; ``'ip'`` on L2-normalised rows (cosine) for embeddings.
    Returns ``knn_accuracy`` (NaN when no type can be scored), ``k``, ``random_baseline``, ``n_scored``,
    ``n_types_scored``, ``per_type`` ({type: {accuracy, n, n_reference}}) and ``excluded_types``
    ({type: number of reference cells}).
    """
    gen_labels = np.asarray(gen_labels).astype(str)
    ref_labels = np.asarray(ref_labels).astype(str)
    if len(gen_labels) != len(gen_x) or len(ref_labels) != len(ref_x):
        raise ValueError("each cell needs one label")
    ref_types, ref_counts = np.unique(ref_labels, return_counts=True)
    n_ref = dict(zip(ref_types.tolist(), ref_counts.tolist()))
    gen_types = sorted(set(gen_labels.tolist()))
    scored = [t for t in gen_types if n_ref.get(t, 0) >= k]
    excluded = {t: int(n_ref.get(t, 0)) for t in gen_types if n_ref.get(t, 0) < k}
    result: dict[str, Any] = {"knn_accuracy": float("nan"), "k": int(k), "metric": metric,
                              "random_baseline": 1.0 / len(scored) if scored else float("nan"),
                              "n_scored": 0, "n_types_scored": len(scored), "per_type": {},
                              "excluded_types": excluded}
    if not scored:
        return result
    keep = np.isin(gen_labels, scored)
    q, q_labels = np.asarray(gen_x, dtype=np.float32)[keep], gen_labels[keep]
    ref = np.asarray(ref_x, dtype=np.float32)
    if metric == "ip":
        q, ref = l2_normalise(q), l2_normalise(ref)
    _, ids = knn_search(build_index(ref, metric), q, k)
    pred, _ = knn_vote(ref_labels[ids])
    hit = pred.astype(str) == q_labels
    result["knn_accuracy"] = float(hit.mean())
    result["n_scored"] = int(hit.size)
    result["per_type"] = {t: {"accuracy": float(hit[q_labels == t].mean()), "n": int((q_labels == t).sum()),
                              "n_reference": int(n_ref[t])} for t in scored}
    return result
