"""How expression becomes cell-tower input: the one owner of normalisation, value encoding, padding and length.

A :class:`CellEncoding` is saved in every model folder (``cell_encoding.json``) and loaded with it, so training,
inference and evaluation encode cells the same way. :func:`encode_cells` turns rows of a cell x gene matrix into a
padded batch; the corpus loader, the h5ad reader and the pseudo-cell scorer all call it.

A batch row is ``<cls>`` followed by the cell's expressed genes in column order (as gene vocabulary ids):

1. normalisation (:func:`log1p_normalize`): raw counts become ``log1p(x / total * target_sum)``, the total being
   the cell's sum over the given columns; values already log1p-normalised are used as they are;
2. value encoding: with ``n_bins`` > 0, scGPT binning of each cell's values into ``1 .. n_bins - 1`` by the cell's
   own quantiles (:func:`binning`); with 0, the continuous log1p values;
3. length: a cell with more expressed genes than the limit allows keeps a uniform sample of them (without
   replacement, in column order). Training allows ``max_len`` tokens (``<cls>`` included); inference allows
   ``inference_max_len`` (0: every expressed gene, so the model sees the whole cell);
4. padding: gene id ``<pad>``, value ``pad_value``, ``padding_mask`` True; ``<cls>`` carries the value 0.

Randomness (binning ties, the length sample) comes from the generator(s) the caller passes, so each caller decides
what keeps its output reproducible: the loader seeds one generator per batch (exact resume), inference one per cell
(:func:`cell_rng`: results independent of chunking and batching).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from scmm.config import from_dict, read_json
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError

__all__ = ["CellEncoding", "ENCODING_FILE", "NORMALIZATIONS", "binning", "cell_rng", "encode_cells",
           "log1p_normalize"]

ENCODING_FILE = "cell_encoding.json"
NORMALIZATIONS = ("counts", "log1p")


@dataclass
class CellEncoding:
    """How a model reads a cell (see the module docstring); saved beside the model's weights."""

    target_sum: float = 1e4  # counts -> log1p(x / cell total * target_sum)
    n_bins: int = 51  # > 0: scGPT value binning into 1..n_bins-1; 0: continuous log1p values
    pad_value: float = -2.0
    mask_value: float = -1.0  # the value of a masked gene in masked-expression training
    max_len: int = 1200  # training: <cls> + at most max_len - 1 genes (a uniform sample beyond)
    inference_max_len: int = 0  # inference: 0 keeps every expressed gene; > 0 caps as in training
    seed: int = 0  # inference draws (binning ties, length samples) are seeded by (seed, cell)

    def __post_init__(self) -> None:
        if not self.target_sum > 0:
            raise ValueError(f"target_sum must be > 0, got {self.target_sum}")
        if self.n_bins < 0 or self.n_bins == 1:
            raise ValueError(f"n_bins must be 0 (continuous values) or >= 2, got {self.n_bins}")
        if self.max_len < 2 or self.inference_max_len < 0 or self.inference_max_len == 1:
            raise ValueError("max_len must be >= 2, inference_max_len 0 (no limit) or >= 2")
        if self.pad_value == self.mask_value:
            raise ValueError("pad_value and mask_value must differ")

    def length_limit(self, training: bool) -> int | None:
        """Most tokens per cell, ``<cls>`` included (None: no limit)."""
        return self.max_len if training else (self.inference_max_len or None)

    def save(self, folder: str | Path) -> None:
        (Path(folder) / ENCODING_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> CellEncoding:
        """The encoding saved in a model folder; a folder without one is an error, never a guess."""
        path = Path(folder) / ENCODING_FILE
        if not path.is_file():
            raise ScmmError(f"model folder {folder} has no {ENCODING_FILE} (how the model encodes cells): it was "
                            f"written by an older scmm; train or package it again")
        return from_dict(cls, read_json(path, "cell encoding"), where="encoding")


def log1p_normalize(matrix: sp.spmatrix, normalization: str, target_sum: float = 1e4,
                    dtype: type = np.float64) -> sp.csr_matrix:
    """log1p(x / row total * target_sum) of a cell x gene matrix of counts (``normalization='counts'``), or the
    stored values of an already log1p-normalised one (``'log1p'``): a new CSR of ``dtype``, explicit zeros dropped."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {normalization!r}")
    m = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    m.eliminate_zeros()
    if normalization == "counts":
        totals = np.asarray(m.sum(axis=1)).ravel()
        scale = np.where(totals > 0, target_sum / np.maximum(totals, 1e-300), 0.0)
        m.data *= np.repeat(scale, np.diff(m.indptr))
        np.log1p(m.data, out=m.data)
    return m if dtype == np.float64 else m.astype(dtype)


_BIN_PLANS: dict[tuple[int, int], tuple] = {}


def binning(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """scGPT value binning of one cell's non-zero values into 1..n_bins-1 by the cell's own quantiles.

    Same result as upstream's ``np.quantile`` edges + two ``np.digitize`` calls, computed from one sort (numpy's
    linear-interpolation quantile formula, its interpolation weights cached per cell size). Ties between bin edges
    are spread uniformly as upstream does, but with a seeded generator.
    """
    n = values.size
    if n == 0:
        return values.astype(np.float32)
    plan = _BIN_PLANS.get((n, n_bins))
    if plan is None:
        position = np.linspace(0, 1, n_bins - 1) * (n - 1)
        lo = np.floor(position).astype(np.intp)
        frac = position - lo
        plan = (lo, np.minimum(lo + 1, n - 1), frac, frac >= 0.5)
        if len(_BIN_PLANS) < 100_000:  # one small entry per distinct number of expressed genes
            _BIN_PLANS[(n, n_bins)] = plan
    lo, hi, frac, upper = plan
    ordered = np.sort(values)
    a, b = ordered[lo], ordered[hi]
    edges = np.where(upper, b - (b - a) * (1 - frac), a + (b - a) * frac)  # numpy's own lerp
    left = np.searchsorted(edges, values, side="right")  # np.digitize(values, edges)
    right = np.searchsorted(edges, values, side="left")  # np.digitize(values, edges, right=True)
    return np.ceil(rng.random(n) * (right - left) + left).astype(np.float32)


def cell_rng(seed: int, row: int) -> np.random.Generator:
    """The generator of one cell at inference: a function of (seed, the cell's row) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7, int(row)]))


def encode_cells(matrix: sp.spmatrix, gene_ids: np.ndarray, vocab: GeneVocab, encoding: CellEncoding, *,
                 normalization: str, training: bool,
                 rng: np.random.Generator | Sequence[np.random.Generator]) -> dict[str, torch.Tensor]:
    """Rows of ``matrix`` (cells x genes; column j is vocabulary id ``gene_ids[j]``) -> a padded batch
    ``{gene_ids, values, padding_mask}`` of ``[n, L]`` tensors (see the module docstring).

    ``normalization``: ``'counts'`` or ``'log1p'`` (what the stored values are); ``training`` picks the length
    limit; ``rng``: one generator drawn from row after row, or one generator per row.
    """
    gene_ids = np.asarray(gene_ids, dtype=np.int64)
    m = log1p_normalize(matrix, normalization, encoding.target_sum)
    if m.shape[1] != len(gene_ids):
        raise ValueError(f"{m.shape[1]} matrix columns but {len(gene_ids)} gene ids")
    n = m.shape[0]
    per_row = not isinstance(rng, np.random.Generator)
    if per_row and len(rng) != n:
        raise ValueError(f"{len(rng)} generators for {n} cells")
    limit = encoding.length_limit(training)
    genes: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for r in range(n):
        gen = rng[r] if per_row else rng
        lo, hi = m.indptr[r], m.indptr[r + 1]
        idx, val = m.indices[lo:hi], m.data[lo:hi]
        if encoding.n_bins > 0:
            val = binning(val, encoding.n_bins, gen)
        if limit is not None and len(idx) > limit - 1:
            pick = np.sort(gen.choice(len(idx), limit - 1, replace=False))
            idx, val = idx[pick], val[pick]
        genes.append(gene_ids[idx])
        values.append(val)
    return pad_cells(genes, values, vocab, encoding.pad_value)


def pad_cells(genes: list[np.ndarray], values: list[np.ndarray], vocab: GeneVocab,
              pad_value: float) -> dict[str, torch.Tensor]:
    """``<cls>`` + each cell's (gene id, value) pairs, padded to the longest cell."""
    n = len(genes)
    length = 1 + max((len(g) for g in genes), default=0)
    ids = np.full((n, length), vocab.pad_id, dtype=np.int64)
    vals = np.full((n, length), pad_value, dtype=np.float32)
    ids[:, 0], vals[:, 0] = vocab.cls_id, 0.0
    for i, (g, v) in enumerate(zip(genes, values)):
        ids[i, 1:1 + len(g)], vals[i, 1:1 + len(v)] = g, v
    ids_t = torch.from_numpy(ids)
    return {"gene_ids": ids_t, "values": torch.from_numpy(vals), "padding_mask": ids_t == vocab.pad_id}
