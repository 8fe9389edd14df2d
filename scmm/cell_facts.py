"""Each cell's own facts, measured on its expression, and a description's claims checked against them.

``scmm describe`` writes, besides the LLM's description, what the cell's expression says (the same computation as
the corpus's per-cell facts, :class:`~scmm.data_pipeline.facts.FactModel`, with the training split's statistics
that the model folder keeps in ``facts.json``):

* ``obs['scmm_programs']``: the cell's :data:`SHOWN_PROGRAMS` most active hallmark programs, most active first
  (standardised scores: 0 is the training average);
* ``obs['scmm_markers']``: its :data:`SHOWN_MARKERS` most over-expressed genes against the training cells
  (z-score of log1p CP10k among the genes it expresses);
* ``obs['scmm_claims_supported']``: the share of the description's claims that hold for the cell: a program it
  names is among the cell's top 3 programs, a gene among its top 20 over-expressed genes (the rules of ``scmm eval``'s
  ``language.*`` figures, :mod:`scmm.eval.language`); NaN where the description makes no such claim.

A model trained on a corpus without facts has no ``facts.json``: the columns are then left out, and the log says so.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scmm.data_pipeline.fact_text import PROGRAM_PHRASES, parse_claims
from scmm.data_pipeline.facts import FactModel
from scmm.eval.language import TOP_MARKERS, TOP_PROGRAMS
from scmm.output_names import CLAIMS_SUPPORTED, MARKERS, PROGRAMS

__all__ = ["CellFacts", "measure", "claims_supported", "SHOWN_PROGRAMS", "SHOWN_MARKERS"]

SHOWN_PROGRAMS = TOP_PROGRAMS
SHOWN_MARKERS = 5


@dataclass
class CellFacts:
    """The measured facts of a block of cells: top programs (hallmark set names) and marker symbols, in order."""

    programs: list[list[str]]  # the top TOP_PROGRAMS per cell
    markers: list[list[str]]  # up to TOP_MARKERS per cell

    def columns(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The obs columns of these cells with their descriptions ``texts``."""
        return {PROGRAMS: np.array([", ".join(PROGRAM_PHRASES.get(p, p) for p in row[:SHOWN_PROGRAMS])
                                    for row in self.programs], dtype=object),
                MARKERS: np.array([", ".join(row[:SHOWN_MARKERS]) for row in self.markers], dtype=object),
                CLAIMS_SUPPORTED: claims_supported(texts, self)}


def measure(facts: FactModel, panel: sp.csr_matrix) -> CellFacts:
    """The facts of cells given as linear values over the model's gene panel (``facts.symbols`` order)."""
    scores, markers = facts.facts(panel)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_PROGRAMS]
    return CellFacts([[facts.program_names[p] for p in row] for row in order],
                     [[str(facts.symbols[g]) for g in row[:TOP_MARKERS] if g >= 0] for row in markers])


def claims_supported(texts: Sequence[str], cells: CellFacts) -> np.ndarray:
    """Per cell, the share of its text's program and gene claims that its facts support (NaN: no claim)."""
    out = np.full(len(texts), np.nan, dtype=np.float32)
    for i, text in enumerate(texts):
        claims = parse_claims(str(text))
        n = len(claims.programs) + len(claims.genes)
        if n:
            hits = len(set(claims.programs) & set(cells.programs[i])) + len(set(claims.genes) & set(cells.markers[i]))
            out[i] = hits / n
    return out
