"""Batch kernels of the cell encoding: rows of a CSR matrix -> padded numpy arrays, a whole batch per numpy call.

:mod:`scmm.data_pipeline.encoding` owns the policy (:class:`~scmm.data_pipeline.encoding.CellEncoding`, which
generator draws what) and returns tensors; the arithmetic lives here. These functions need numpy and scipy only,
no torch, so that another loader can be measured doing exactly scmm's work (``benchmarks/bench_loader.py`` runs them
on annbatch's batches in a Python 3.12 environment that has no CPU build of torch).

Per batch the cost is a few numpy calls over all its values (one sort by value, a radix sort by row, scatters and
counts); Python loops over cells remain only where a generator per cell is asked for (inference: one draw call per
cell) or a cell is longer than the length limit.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

#: what stored values are: raw counts, linear-normalised values (any per-cell scaling of counts; read exactly as
#: counts: the per-cell renormalisation cancels the scale), or log1p values used as given (corpora written before
#: scmm.data_pipeline.scale, and generated pseudo-cells)
NORMALIZATIONS = ("counts", "normalized", "log1p")
#: the total every cell is scaled to before log1p (counts per 10,000: scGPT's and scanpy's usual target)
CP10K = 1e4


def log1p_normalize(matrix: sp.spmatrix, normalization: str, target_sum: float = CP10K,
                    dtype: type = np.float64) -> sp.csr_matrix:
    """log1p(x / row total * target_sum) of a cell x gene matrix of counts or linear-normalised values
    (``normalization='counts'`` or ``'normalized'``), or the stored values of an already log1p-normalised one
    (``'log1p'``): a new CSR of ``dtype``, explicit zeros dropped."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {normalization!r}")
    m = sp.csr_matrix(matrix)
    data, indices, indptr = m.data.astype(np.float64), m.indices, m.indptr
    rows = np.repeat(np.arange(m.shape[0]), np.diff(indptr))
    if not data.all():  # explicit zeros are not expressed genes
        keep = data != 0
        data, indices, rows = data[keep], indices[keep], rows[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m.shape[0]))])
    if normalization != "log1p":
        totals = np.bincount(rows, weights=data, minlength=m.shape[0])
        scale = np.where(totals > 0, target_sum / np.maximum(totals, 1e-300), 0.0)
        data *= scale[rows]
        np.log1p(data, out=data)
    return sp.csr_matrix((data.astype(dtype, copy=False), indices.copy(), indptr.copy()), shape=m.shape)


def _up_to(positions: np.ndarray, n: int) -> np.ndarray:
    """``out[i]`` = how many of ``positions`` are <= i, for i in 0..n."""
    return np.cumsum(np.bincount(positions.ravel(), minlength=n + 1))


def bin_rows(data: np.ndarray, indptr: np.ndarray, n_bins: int, draws: np.ndarray) -> np.ndarray:
    """scGPT value binning of every row of a CSR matrix (its ``data`` and ``indptr``) into 1..n_bins-1 by the row's
    own quantiles; ``draws`` (one uniform number in [0, 1) per value) spread values that fall on several edges.

    The same numbers as upstream's ``np.quantile`` edges and two ``np.digitize`` calls per cell. Each edge is numpy's
    linear interpolation between two neighbouring sorted values ``a <= edge <= b`` of its row, so which values lie
    below or on it follows from the tie groups of ``a`` and ``b`` alone; the digitize sides are then two integer
    counts over all rows at once.
    """
    data = np.asarray(data, dtype=np.float64)
    n = data.size
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    indptr = np.asarray(indptr, dtype=np.intp)
    counts = np.diff(indptr)
    rows = np.repeat(np.arange(len(counts)), counts)
    by_value = np.argsort(data)
    # then stably by row: a radix sort when the row numbers fit in 16 bits
    row_dtype = np.int16 if len(counts) < 2**15 else np.int64
    order = by_value[np.argsort(rows[by_value].astype(row_dtype), kind="stable")]
    ordered = data[order]
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n)  # where each value sits in its row's sorted run (global position)
    # tie groups of the sorted runs: first position and end (exclusive) of the group of each position
    new = np.ones(n, dtype=bool)
    new[1:] = ordered[1:] != ordered[:-1]
    new[indptr[:-1][counts > 0]] = True
    heads = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    first, end = heads[group], np.append(heads[1:], n)[group]
    # edges: numpy's quantile (linear method) between sorted positions lo and hi of each row
    last = np.maximum(counts - 1, 0)[:, None]
    position = np.linspace(0, 1, n_bins - 1)[None, :] * last
    lo = np.floor(position).astype(np.intp)
    frac = position - lo
    start = np.minimum(indptr[:-1], n - 1)[:, None]  # empty rows: any valid position, replaced below
    at_lo, at_hi = start + lo, start + np.minimum(lo + 1, last)
    a, b = ordered[at_lo], ordered[at_hi]
    edges = np.where(frac >= 0.5, b - (b - a) * (1 - frac), a + (b - a) * frac)  # numpy's own lerp
    # global position of the first value >= each edge (ge) and of the first value > it (gt)
    ge = np.where(edges == a, first[at_lo], end[at_lo])
    gt = np.where(edges == b, end[at_hi], end[at_lo])
    empty = counts == 0
    ge[empty], gt[empty] = indptr[:-1][empty, None], indptr[:-1][empty, None]
    k = n_bins - 1
    # edge <= value  <=>  the value's tie group starts at or after `ge`; edge < value  <=>  its position is at or
    # after `gt`. Counted for all rows at once (edges of earlier rows come before, later rows' after, subtracted).
    left = _up_to(ge, n)[first[rank]] - rows * k  # np.digitize(values, edges)
    right = _up_to(gt, n)[rank] - rows * k  # np.digitize(values, edges, right=True)
    return np.ceil(draws * (right - left) + left).astype(np.float32)


def binning(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """scGPT value binning of one cell's non-zero values into 1..n_bins-1 by the cell's own quantiles; ties between
    bin edges are spread uniformly as upstream does, with draws from ``rng``."""
    values = np.asarray(values, dtype=np.float64)
    return bin_rows(values, np.array([0, values.size]), n_bins, rng.random(values.size))


def pad_rows(genes: np.ndarray, values: np.ndarray, indptr: np.ndarray, cls_id: int, pad_id: int,
             pad_value: float) -> dict[str, np.ndarray]:
    """``<cls>`` (value 0) + each row's (gene id, value) pairs, padded to the longest row: ``gene_ids`` [n, L] int64,
    ``values`` [n, L] float32, ``padding_mask`` [n, L] bool."""
    counts = np.diff(indptr)
    n = len(counts)
    length = 1 + int(counts.max(initial=0))
    ids = np.full((n, length), pad_id, dtype=np.int64)
    vals = np.full((n, length), pad_value, dtype=np.float32)
    ids[:, 0], vals[:, 0] = cls_id, 0.0
    flat = np.arange(len(genes)) + np.repeat(np.arange(n) * length + 1 - np.asarray(indptr[:-1]), counts)
    ids.ravel()[flat], vals.ravel()[flat] = genes, values
    return {"gene_ids": ids, "values": vals, "padding_mask": ids == pad_id}


def encode_rows(matrix: sp.spmatrix, gene_ids: np.ndarray, *, normalization: str, target_sum: float, n_bins: int,
                limit: int | None, cls_id: int, pad_id: int, pad_value: float,
                rng: np.random.Generator | Sequence[np.random.Generator]) -> dict[str, np.ndarray]:
    """Rows of a cell x gene matrix (column j is vocabulary id ``gene_ids[j]``) -> padded arrays: normalise, bin
    (``n_bins`` > 0) or keep log1p values, keep a uniform sample of ``limit - 1`` genes of longer cells (column
    order), ``<cls>``, pad. ``rng``: one generator drawn from for the whole batch (binning draws for all cells first,
    then the samples of long cells in row order), or one per row (each row's draws from its own)."""
    m = log1p_normalize(matrix, normalization, target_sum)
    if m.shape[1] != len(gene_ids):
        raise ValueError(f"{m.shape[1]} matrix columns but {len(gene_ids)} gene ids")
    per_row = not isinstance(rng, np.random.Generator)
    counts = np.diff(m.indptr)
    if per_row and len(rng) != len(counts):
        raise ValueError(f"{len(rng)} generators for {len(counts)} cells")
    values = m.data
    if n_bins > 0:
        draws = (np.concatenate([g.random(c) for g, c in zip(rng, counts)] + [np.zeros(0)]) if per_row
                 else rng.random(values.size))
        values = bin_rows(values, m.indptr, n_bins, draws)
    columns, indptr = m.indices, m.indptr
    if limit is not None and (counts > limit - 1).any():
        keep = np.ones(values.size, dtype=bool)
        for r in np.flatnonzero(counts > limit - 1):
            gen = rng[r] if per_row else rng
            drop = np.ones(counts[r], dtype=bool)
            drop[gen.choice(counts[r], limit - 1, replace=False)] = False
            keep[indptr[r]:indptr[r + 1]][drop] = False
        columns, values = columns[keep], values[keep]
        indptr = np.concatenate([[0], np.cumsum(np.minimum(counts, limit - 1))])
    return pad_rows(np.asarray(gene_ids, dtype=np.int64)[columns], values.astype(np.float32), indptr,
                    cls_id, pad_id, pad_value)
