"""Chunked AnnData input -> model batches, with the corpus build's gene identity and normalisation.

The input is an ``.h5ad`` path (read chunk by chunk with :mod:`scmm.data_pipeline.h5ad`: obs/var in memory, the
expression matrix never whole), a backed AnnData (read through its file the same way), or an in-memory
AnnData. The expression element is chosen as the corpus build chooses it: ``layers['counts']``, then
``.raw.X``, then ``.X`` (or ``layer=`` "X", "raw", a layer name).

Genes map onto the model's gene vocabulary with :func:`scmm.data_pipeline.vocab.map_genes` (symbols from
``var['feature_name']``/a named column/the var names, Ensembl IDs with or without version); two input genes
reaching one vocabulary id keep the first. When the model records its training gene panel (a packaged
model), only panel genes are kept: the others have embeddings that training never touched. Coverage is
logged before any work and checked as the corpus build checks it: the share of input genes in the
vocabulary (:func:`scmm.data_pipeline.vocab.check_coverage`); below ``min_coverage`` (default 0.5) it is a
:class:`ScmmError`. The share of the training panel present in the input is logged too (a warning below
``min_coverage``: a model trained on a union of datasets may know far more genes than one input has), and
an input with no panel gene at all is an error.

The values' scale (raw counts, linear-normalised, log1p or log2(x+1) of those) is decided as the corpus build
decides it, from a bounded sample of cells (:func:`scmm.data_pipeline.scale.detect_scale`; ``input_scale`` overrides
it), and every chunk is converted to linear values (:func:`scmm.data_pipeline.scale.to_linear`: logs undone, and
values the sample did not see checked against the decision; NaN/negative values are an error) before the
encoding renormalises each cell. Batches come from :func:`scmm.data_pipeline.encoding.encode_cells` with the
model's encoding at inference (each cell's draws seeded by the encoding's seed and the cell's row, so results do
not depend on chunking); inside a chunk, cells are grouped by length so that little is padded.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scmm.data_pipeline.encoding import CellEncoding, cell_rng, encode_cells
from scmm.data_pipeline.h5ad import as_csr, check_values, open_h5ad
from scmm.data_pipeline.scale import ScaleDecision, detect_scale, to_linear
from scmm.data_pipeline.vocab import GeneVocab, check_coverage, map_genes
from scmm.errors import ScmmError

__all__ = ["DEFAULT_MIN_COVERAGE", "GenePlan", "ScaleDecision", "detect_scale", "iter_batches", "iter_panel_chunks",
           "open_input", "plan_genes"]

log = logging.getLogger("scmm.reader")
DEFAULT_MIN_COVERAGE = 0.5


# --- sources ----------------------------------------------------------------------------------------
class _MemorySource:
    """An in-memory AnnData as a chunked source (same interface as data_pipeline.h5ad.H5adSource)."""

    def __init__(self, adata, element: str | None):
        if element is None:
            element = "layers/counts" if "counts" in adata.layers else ("raw/X" if adata.raw is not None else "X")
        elif element == "raw":
            element = "raw/X"
        elif element != "X":
            element = f"layers/{element}"
        if element == "raw/X":
            if adata.raw is None:
                raise ScmmError("the AnnData has no .raw")
            self.matrix, self.var = adata.raw.X, adata.raw.var
        elif element == "X":
            self.matrix, self.var = adata.X, adata.var
        else:
            name = element[len("layers/"):]
            if name not in adata.layers:
                raise ScmmError(f"the AnnData has no layer '{name}'")
            self.matrix, self.var = adata.layers[name], adata.var
        if self.matrix is None:
            raise ScmmError("the AnnData has no expression matrix (.X is None)")
        self.path, self.element, self.obs = Path("<AnnData>"), element, adata.obs
        self.n_obs, self.n_vars = self.matrix.shape
        if self.n_obs == 0 or self.n_vars == 0:
            raise ScmmError(f"the expression matrix is empty ({self.n_obs} cells x {self.n_vars} genes)")

    def iter_chunks(self, chunk_size: int, begin: int = 0, end: int | None = None
                    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        end = self.n_obs if end is None else min(end, self.n_obs)
        for start in range(begin, end, chunk_size):
            block = as_csr(self.matrix[start:min(start + chunk_size, end)])
            check_values(block.data, f"{self.path} (rows from {start})")
            yield start, block.astype(np.float32)

    def read_rows(self, ranges: list[tuple[int, int]]) -> Iterator[sp.csr_matrix]:
        for start, stop in ranges:
            yield as_csr(self.matrix[start:stop])


def open_input(data: Any, layer: str | None = None):
    """A chunked source over an h5ad path, a backed AnnData or an in-memory AnnData."""
    if isinstance(data, (str, Path)):
        return open_h5ad(data, layer, read_obs=False)
    if getattr(data, "isbacked", False):
        return open_h5ad(data.filename, layer, read_obs=False)
    if hasattr(data, "obs") and hasattr(data, "var") and hasattr(data, "X"):
        return _MemorySource(data, layer)
    raise ScmmError(f"input must be an .h5ad path or an AnnData, not {type(data).__name__}")


# --- genes ------------------------------------------------------------------------------------------
@dataclass
class GenePlan:
    """Which input columns feed the model, in vocabulary-id order, and their vocabulary ids."""

    columns: np.ndarray  # input column indices
    vocab_ids: np.ndarray  # vocabulary id of each of those columns
    report: dict


def plan_genes(var: pd.DataFrame, vocab: GeneVocab, panel_vocab_ids: np.ndarray | None = None,
               gene_column: str | None = None, min_coverage: float = DEFAULT_MIN_COVERAGE,
               where: str = "input") -> GenePlan:
    """Map the input genes to the model's vocabulary and training panel (see the module docstring); logs
    coverage; too low is an error."""
    if not 0.0 <= min_coverage <= 1.0:
        raise ScmmError("--min-gene-coverage must be between 0 and 1")
    mapping = map_genes(var, vocab, gene_column)
    ids = mapping.gene_ids.copy()
    dup = pd.Index(ids).duplicated() & (ids >= 0)
    if dup.any():
        log.warning("%s: %d genes reach a vocabulary id already taken by an earlier gene; the first is kept",
                    where, int(dup.sum()))
        ids[dup] = -1
    report = mapping.report()
    log.info("%s: %d/%d genes map to the model's vocabulary (%.1f%%, var column '%s')", where,
             mapping.n_mapped, mapping.n_genes, 100 * mapping.coverage, mapping.column)
    if mapping.id_table is not None:
        log.info("%s: %d genes given as Ensembl IDs mapped through %s %s (%s)", where, mapping.via_table,
                 mapping.id_table["package"], mapping.id_table["version"], mapping.id_table["file"])
    check_coverage(mapping, min_coverage)
    panel = panel_vocab_ids
    if panel is not None:
        in_panel = np.isin(ids, panel) & (ids >= 0)
        ids[~in_panel] = -1
        n_used = int(in_panel.sum())
        panel_cov = n_used / max(len(panel), 1)
        report.update({"panel_size": int(len(panel)), "panel_genes_present": n_used,
                       "panel_coverage": round(panel_cov, 6)})
        (log.warning if panel_cov < min_coverage else log.info)(
            "%s: %d/%d genes of the model's training gene panel are in the input (%.1f%%); only those are used",
            where, n_used, len(panel), 100 * panel_cov)
    if not (ids >= 0).any():
        raise ScmmError(f"{where}: no input gene is among the genes the model was trained on "
                        f"(var column '{mapping.column}'; examples: {', '.join(map(str, mapping.names[:5]))})")
    cols = np.flatnonzero(ids >= 0)
    order = np.argsort(ids[cols], kind="stable")
    report["genes_used"] = int(cols.size)
    return GenePlan(columns=cols[order], vocab_ids=ids[cols[order]], report=report)


# --- batches ----------------------------------------------------------------------------------------
def iter_batches(source, plan: GenePlan, scale: ScaleDecision, encoding: CellEncoding, vocab: GeneVocab,
                 chunk_size: int, batch_size: int, begin: int = 0, end: int | None = None
                 ) -> Iterator[tuple[np.ndarray, dict]]:
    """(global row indices, batch) over the input's rows ``begin:end`` (default all); each chunk is converted to
    linear values by ``scale`` (:func:`~scmm.data_pipeline.scale.to_linear`); within a chunk cells are grouped by
    length. A batch never spans two chunks (chunks start at ``begin + i * chunk_size``)."""
    if chunk_size < 1 or batch_size < 1:
        raise ScmmError("--chunk-size and --batch-size must be positive")
    for start, block in source.iter_chunks(chunk_size, begin, end):
        block = to_linear(block, scale, f"{source.path} (rows from {start})")
        sub = block[:, plan.columns].tocsr()
        sub.eliminate_zeros()
        order = np.argsort(np.diff(sub.indptr), kind="stable")
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            batch = encode_cells(sub[rows], plan.vocab_ids, vocab, encoding, normalization=scale.stored,
                                 training=False, rng=[cell_rng(encoding.seed, start + r) for r in rows])
            yield start + rows, batch


def iter_panel_chunks(source, plan: GenePlan, scale: ScaleDecision, panel_vocab_ids: np.ndarray, chunk_size: int,
                      begin: int = 0, end: int | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, linear values [rows, len(panel)]) per chunk of the input's rows ``begin:end``: the input's genes
    placed in the training panel's order (``panel_vocab_ids``), a panel gene the input lacks all zeros; what the
    per-cell facts (:class:`~scmm.data_pipeline.facts.FactModel`) are computed on, as at corpus build."""
    position = {int(v): i for i, v in enumerate(panel_vocab_ids)}
    keep = np.array([int(v) in position for v in plan.vocab_ids], dtype=bool)
    columns = plan.columns[keep]
    target = np.array([position[int(v)] for v in plan.vocab_ids[keep]], dtype=np.int64)
    for start, block in source.iter_chunks(chunk_size, begin, end):
        sub = to_linear(block, scale, f"{source.path} (rows from {start})")[:, columns].tocoo()
        panel = sp.csr_matrix((sub.data, (sub.row, target[sub.col])), shape=(sub.shape[0], len(panel_vocab_ids)))
        panel.sum_duplicates()
        yield start, panel
