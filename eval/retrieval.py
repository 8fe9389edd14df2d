"""Cell <-> text retrieval metrics on paired embeddings (pair i <-> i is the match).

Both sides are L2-normalised, so inner product = cosine similarity. For a query ``i`` with match score
``s_ii``, ``g`` = number of candidates scoring above ``s_ii + tie_tol`` and ``e`` = number of *other* candidates
within ``tie_tol`` of it. Ties are broken at random in expectation:

* ``*_recall@k`` = mean over queries of P(match within the top k) = ``clip((k - g) / (e + 1), 0, 1)``;
* ``*_mean_rank`` = mean over queries of the expected rank ``1 + g + e / 2`` (1 is best; not in [0, 1]).

So when many cells share one text (identical text embeddings), exact-pair recall is hard by construction: a
cell whose text is shared by ``n`` cells finds *its* copy at rank 1 with probability ``1 / n`` at best.
Label-level recall (``*_label_recall@k``, only when ``cell_labels`` is given) counts a hit when any of the top
``k`` retrieved items has the query's label (ties inside the top k broken arbitrarily).

Computation, in two parts, both bounded in memory:

* **Top k through FAISS** (:mod:`eval.knn`): an exact ``IndexFlatIP`` over the L2-normalised targets (texts for
  cell->text, cells for text->cell), a GPU index when the faiss build and a GPU are present, the CPU index
  otherwise; queries are searched in batches. These are the retrieved lists (label-level recall).
* **Exact ranks**: ``g`` and ``e`` need every score of a query against all targets, so they are counted in one
  blocked pass over the N x N inner products (torch matmul, on CUDA when available), never materialising the
  matrix: each block of cells gives the cell->text counts of its rows and adds to the text->cell counts of
  every column. A block holds about ``block_bytes`` (default 64 MiB) of scores. Exact-pair recall and mean
  rank come from these counts, so they are exact and tie-aware whatever FAISS returns among tied scores.

Memory at 100,000 pairs of 256-d embeddings: the two embedding matrices (2 x 100 MB), one 64 MiB score block
plus its boolean masks, and the [N, 10] FAISS results; well within 2 GB (``benchmarks/bench_eval_memory.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from scmm.eval.knn import build_index, knn_search, l2_normalise

__all__ = ["retrieval_metrics", "match_counts", "faiss_topk"]

DEFAULT_KS = (1, 5, 10)


def faiss_topk(queries: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Indices [M, min(k, N)] of the highest inner-product targets per query, best first (exact FAISS search)."""
    k = min(int(k), len(targets))
    if k < 1:
        return np.zeros((len(queries), 0), dtype=np.int64)
    index = build_index(targets, "ip")
    try:
        _, ids = knn_search(index, queries, k)
    finally:
        index.reset()
    return ids


def match_counts(queries: np.ndarray, targets: np.ndarray, tie_tol: float = 1e-5, topk: int = 0,
                 block_bytes: int = 64 << 20, device: str | None = None) -> dict[str, np.ndarray]:
    """Exact-pair counts for both directions in one blocked pass (inputs used as given: normalise first).

    Returns ``g_row``, ``e_row`` (query ``i`` = ``queries[i]`` against all targets), ``g_col``, ``e_col``
    (query ``j`` = ``targets[j]`` against all queries) and, with ``topk > 0``, ``top_row`` [N, topk] /
    ``top_col`` [N, topk]: indices of the highest-scoring targets per query row / queries per target column,
    found by FAISS (:func:`faiss_topk`).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    t = np.ascontiguousarray(targets, dtype=np.float32)
    if q.ndim != 2 or t.shape != q.shape:
        raise ValueError(f"paired embeddings need equal [N, D] shapes, got {q.shape} and {t.shape}")
    n = len(q)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = dev.type == "cpu"
    diag = np.einsum("ij,ij->i", q.astype(np.float64), t.astype(np.float64)).astype(np.float32)
    hi_all, lo_all = diag + tie_tol, diag - tie_tol
    qt, tt = torch.from_numpy(q).to(dev), torch.from_numpy(t).to(dev)
    hi_t, lo_t = torch.from_numpy(hi_all).to(dev), torch.from_numpy(lo_all).to(dev)
    block = max(1, min(n, block_bytes // max(1, 4 * n)))
    out = {name: np.zeros(n, dtype=np.int64) for name in ("g_row", "e_row", "g_col", "e_col")}
    for start in range(0, n, block):
        stop = min(n, start + block)
        s_t = qt[start:stop] @ tt.T  # [b, n]
        if on_cpu:
            s = s_t.numpy()
            hi, lo = hi_all[start:stop, None], lo_all[start:stop, None]
            out["g_row"][start:stop] = (s > hi).view(np.uint8).sum(axis=1, dtype=np.int64)
            out["e_row"][start:stop] = (s >= lo).view(np.uint8).sum(axis=1, dtype=np.int64)
            out["g_col"] += (s > hi_all[None, :]).view(np.uint8).sum(axis=0, dtype=np.int64)
            out["e_col"] += (s >= lo_all[None, :]).view(np.uint8).sum(axis=0, dtype=np.int64)
        else:  # pragma: no cover - needs a GPU
            hi, lo = hi_t[start:stop, None], lo_t[start:stop, None]
            out["g_row"][start:stop] = (s_t > hi).sum(1).cpu().numpy()
            out["e_row"][start:stop] = (s_t >= lo).sum(1).cpu().numpy()
            out["g_col"] += (s_t > hi_t[None, :]).sum(0).cpu().numpy()
            out["e_col"] += (s_t >= lo_t[None, :]).sum(0).cpu().numpy()
        del s_t
    # the match itself is counted in e (>= its own score minus tol) and must not be
    out["g_row"] = np.minimum(out["g_row"], n - 1)
    out["e_row"] = np.maximum(out["e_row"] - out["g_row"] - 1, 0)
    out["g_col"] = np.minimum(out["g_col"], n - 1)
    out["e_col"] = np.maximum(out["e_col"] - out["g_col"] - 1, 0)
    if topk > 0:
        out["top_row"] = faiss_topk(q, t, topk)
        out["top_col"] = faiss_topk(t, q, topk)
    return out


def _summary(g: np.ndarray, e: np.ndarray, top: np.ndarray | None, labels: np.ndarray | None,
             ks: Sequence[int], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"{prefix}_recall@{k}"] = float(np.clip((k - g) / (e + 1.0), 0.0, 1.0).mean())
    out[f"{prefix}_mean_rank"] = float((1.0 + g + e / 2.0).mean())
    if labels is not None and top is not None:
        same = labels[top] == labels[:, None]  # [n, kmax], best first
        for k in ks:
            out[f"{prefix}_label_recall@{k}"] = float(same[:, :k].any(axis=1).mean())
    return out


def retrieval_metrics(cell_emb: np.ndarray, text_emb: np.ndarray, cell_labels: Sequence | None = None,
                      ks: Sequence[int] = DEFAULT_KS, tie_tol: float = 1e-5) -> dict[str, Any]:
    """Cell->text and text->cell recall@k, mean rank and (with labels) label-level recall@k.

    ``cell_emb[i]`` and ``text_emb[i]`` are the matching pair; see the module docstring for the definitions.
    Also returns ``n_pairs``.
    """
    cell_emb, text_emb = np.asarray(cell_emb), np.asarray(text_emb)
    if cell_emb.ndim != 2 or cell_emb.shape != text_emb.shape:
        raise ValueError(f"cell and text embeddings must both be [N, D], got {cell_emb.shape} and {text_emb.shape}")
    if len(cell_emb) == 0:
        raise ValueError("retrieval needs at least one pair")
    labels = None if cell_labels is None else np.asarray(cell_labels).astype(str)
    if labels is not None and len(labels) != len(cell_emb):
        raise ValueError(f"{len(labels)} labels for {len(cell_emb)} pairs")
    c, t = l2_normalise(cell_emb), l2_normalise(text_emb)
    counts = match_counts(c, t, tie_tol, topk=max(ks) if labels is not None else 0)
    out: dict[str, Any] = {"n_pairs": int(len(c))}
    out.update(_summary(counts["g_row"], counts["e_row"], counts.get("top_row"), labels, ks, "cell_to_text"))
    out.update(_summary(counts["g_col"], counts["e_col"], counts.get("top_col"), labels, ks, "text_to_cell"))
    return out
