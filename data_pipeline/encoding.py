"""How expression becomes cell-tower input: the one owner of normalisation, value encoding, padding and length.

A :class:`CellEncoding` is saved in every model folder (``cell_encoding.json``) and loaded with it, so training,
inference and evaluation encode cells the same way. :func:`encode_cells` turns rows of a cell x gene matrix into a
padded batch; the corpus loader, the h5ad reader and the pseudo-cell scorer all call it.

A batch row is ``<cls>`` followed by the cell's expressed genes in column order (as gene vocabulary ids):

1. normalisation (:func:`log1p_normalize`): raw counts and linear-normalised values become
   ``log1p(x / total * target_sum)``, the total being the cell's sum over the given columns (inputs in log scales are
   made linear first: :mod:`scmm.data_pipeline.scale`); stored log1p values (older corpora, pseudo-cells) are used
   as they are;
2. value encoding: with ``n_bins`` > 0, scGPT binning of each cell's values into ``1 .. n_bins - 1`` by the cell's
   own quantiles (:func:`binning`); with 0, the continuous log1p values;
3. length: a cell with more expressed genes than the limit allows keeps a uniform sample of them (without
   replacement, in column order). Training allows ``max_len`` tokens (``<cls>`` included); inference allows
   ``inference_max_len`` (0: every expressed gene, so the model sees the whole cell);
4. padding: gene id ``<pad>``, value ``pad_value``, ``padding_mask`` True; ``<cls>`` carries the value 0.

Randomness (binning ties, the length sample) comes from the generator(s) the caller passes, so each caller decides
what keeps its output reproducible: the loader seeds one generator per batch (exact resume), inference one per cell
(:func:`cell_rng`: results independent of chunking and batching). The arithmetic, a whole batch per numpy call, is
in :mod:`scmm.data_pipeline.collate`.
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
from scmm.data_pipeline.collate import CP10K, NORMALIZATIONS, binning, encode_rows, log1p_normalize
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError

__all__ = ["CellEncoding", "ENCODING_FILE", "NORMALIZATIONS", "binning", "cell_rng", "encode_cells",
           "log1p_normalize"]

ENCODING_FILE = "cell_encoding.json"


@dataclass
class CellEncoding:
    """How a model reads a cell (see the module docstring); saved beside the model's weights."""

    target_sum: float = CP10K  # counts -> log1p(x / cell total * target_sum)
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


def cell_rng(seed: int, row: int) -> np.random.Generator:
    """The generator of one cell at inference: a function of (seed, the cell's row) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7, int(row)]))


def encode_cells(matrix: sp.spmatrix, gene_ids: np.ndarray, vocab: GeneVocab, encoding: CellEncoding, *,
                 normalization: str, training: bool,
                 rng: np.random.Generator | Sequence[np.random.Generator]) -> dict[str, torch.Tensor]:
    """Rows of ``matrix`` (cells x genes; column j is vocabulary id ``gene_ids[j]``) -> a padded batch
    ``{gene_ids, values, padding_mask}`` of ``[n, L]`` tensors (see the module docstring).

    ``normalization``: ``'counts'``, ``'normalized'`` or ``'log1p'`` (what the stored values are); ``training`` picks
    the length limit; ``rng``: one generator for the batch, or one per row
    (:func:`~scmm.data_pipeline.collate.encode_rows`).
    """
    arrays = encode_rows(matrix, gene_ids, normalization=normalization, target_sum=encoding.target_sum,
                         n_bins=encoding.n_bins, limit=encoding.length_limit(training), cls_id=vocab.cls_id,
                         pad_id=vocab.pad_id, pad_value=encoding.pad_value, rng=rng)
    return {key: torch.from_numpy(value) for key, value in arrays.items()}
