"""The scale of an input's expression values: detected from the numbers, logged with its evidence, converted.

One owner for "what are these values?", used by the corpus build and by inference alike. An input is one of

* ``counts``: raw counts (integers);
* ``normalized``: linear-scale normalised values: CP10k, CPM, TPM, fractions, any per-cell scaling of counts;
* ``log1p``: ``ln(1 + x)`` of linear values (``sc.pp.log1p`` after ``normalize_total``, Seurat's LogNormalize);
* ``log2p1``: ``log2(1 + x)`` of linear values (log2(CPM + 1), log2(TPM + 1)).

**Conversion** (:func:`to_linear`): logs are undone (``expm1(x)``, ``2**x - 1``), so every input becomes linear.
The cell encoding then turns linear values into ``log1p(x / cell total * target_sum)`` (the total over the genes
the model reads): any per-cell factor cancels, so counts, CP10k, CPM and log1p(CP10k) of the same cells give the same
model input (up to float rounding). TPM-like values differ by construction (per-gene length factors do not cancel).
A corpus stores counts as they are and every other input as its linear values (manifest ``"normalization"``:
``"counts"``, or ``"normalized"`` when any input was not raw counts; corpora written before this module may say
``"log1p"``: their stored values are log1p values, which the encoding still reads as they are).

**Detection** (:func:`detect_scale`) reads a bounded sample: at most :data:`SAMPLE_CELLS` cells in
:data:`SAMPLE_BLOCKS` row blocks spread evenly over the file, never the whole matrix. Evidence, on the nonzero
values of the sample:

* *integral*: every value is an integer;
* *max*: the largest value; a log is possible only up to :data:`MAX_LOG[scale]` (log1p 20, log2p1 30: beyond, the
  linear value would exceed 4.8e8 / 1.1e9, which no per-cell normalised value nor real count reaches);
* *lattice*, per candidate transform: within a cell, values derived from counts by a per-cell factor are integer
  multiples of the cell's smallest value (its count-1 genes). For a cell with at least :data:`LATTICE_MIN_VALUES`
  values above its smallest one and at most :data:`LATTICE_MAX_RATIO` times it, the cell is *on the lattice* when
  at least 90% of those ratios lie within :data:`LATTICE_TOL` of an integer (values equal to the smallest are left
  out: they fit any transform). The candidate's lattice share is the share of such cells on it; its lattice error
  the median distance to the integers;
* *row sums*, per candidate: the spread ``(max - min) / median`` of the cells' totals after the transform
  (constant for CP10k, CPM or TPM normalised over the file's genes; not when the file is a gene subset).

Rules, in order:

1. integral values: ``counts``; except when at least 3 cells were sampled and every total lies within
   :data:`SUM_TOL` (1%) of one power of ten (10^3..10^7): integer CP10k/CPM-like values, or counts down-sampled to
   one depth. Both read the same, but the file does not say which: *ambiguous*.
2. otherwise each candidate (``normalized``; ``log1p`` and ``log2p1`` when the max allows) is *consistent* when its
   lattice share is at least :data:`LATTICE_SHARE` (0.8) or its row-sum spread at most :data:`SUM_TOL`. One
   consistent candidate is the decision. Several (values so small that ``log1p(x) ~ x``): the one whose misfit (its
   lattice error, or its spread where the lattice says nothing) is at least 10x smaller than every other's wins,
   else *ambiguous*.
3. none consistent: when the max exceeds every log's range (above ``MAX_LOG['log2p1']`` = 30), the values can only
   be linear: ``normalized`` (TPM or CPM of a gene subset, whose totals are not constant; ambient-corrected or
   imputed counts), logged with that evidence. Otherwise (values within a log's range that fit no rule, e.g. log
   values rounded coarsely from a gene subset): *ambiguous*.

Ambiguous input is a :class:`ScmmError` naming ``--input-scale {counts,normalized,log1p,log2p1}``, which also
overrides the detection (``input_scale=`` in the API). Values the sample did not see are checked against the
decision as they stream (:func:`to_linear` with ``check=True``): non-integers in a file read as counts, or values
beyond a log's maximum, stop the run with the same pointer. NaN, infinite and negative values stop it anyway
(:func:`scmm.data_pipeline.h5ad.check_values`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from scmm.data_pipeline.h5ad import FLOAT32_MAX, as_csr, check_values
from scmm.errors import ScmmError

log = logging.getLogger("scmm.scale")

SCALES = ("counts", "normalized", "log1p", "log2p1")
OPTION = "--input-scale {counts,normalized,log1p,log2p1}"
MAX_LOG = {"log1p": 20.0, "log2p1": 30.0}
SAMPLE_CELLS = 2000
SAMPLE_BLOCKS = 8
LATTICE_MIN_VALUES = 3
LATTICE_MAX_RATIO = 10.0
LATTICE_TOL = 0.05
LATTICE_SHARE = 0.8
SUM_TOL = 0.01
MIN_CELLS = 3  # cells needed before row sums count as evidence
WIN_FACTOR = 10.0


@dataclass
class ScaleDecision:
    """What an input's values are (``scale``), how it was decided (``source``: detected or given) and why."""

    scale: str
    source: str = "detected"
    evidence: dict = field(default_factory=dict)

    @property
    def stored(self) -> str:
        """The corpus/encoding name of the linear values this input becomes: ``counts`` or ``normalized``."""
        return "counts" if self.scale == "counts" else "normalized"

    def describe(self) -> str:
        """One line: the decision and its evidence."""
        if self.source == "given":
            return f"values read as {self.scale} (given with --input-scale)"
        return f"values read as {self.scale} ({self.evidence_text()})"

    def evidence_text(self) -> str:
        e = self.evidence
        parts = [f"{e.get('cells_sampled', 0)} cells sampled", f"integral {e.get('integral')}",
                 f"max {e.get('max', 0):.4g}"]
        for name in ("normalized", "log1p", "log2p1"):
            c = e.get("candidates", {}).get(name)
            if c:
                lat = "n/a" if c["lattice_share"] is None else f"{c['lattice_share']:.0%}"
                spread = "n/a" if c["sum_spread"] is None else f"{c['sum_spread']:.2g}"
                median = "" if c["sum_median"] is None else f", median {c['sum_median']:.4g}"
                parts.append(f"as {name}: {lat} of cells on a count lattice, totals spread {spread}{median}")
        if e.get("rule") == "beyond every log":
            parts.append(f"non-integers above every log's range (log1p at most {MAX_LOG['log1p']:g}, log2p1 at most "
                         f"{MAX_LOG['log2p1']:g}): linear, though on no count lattice and without constant totals "
                         f"(TPM of a gene subset, ambient-corrected or imputed values?)")
        if "candidates" not in e and e.get("row_sum_median") is not None:
            parts.append(f"median cell total {e['row_sum_median']:.4g}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


# --- conversion ---------------------------------------------------------------------------------------
def undo(values: np.ndarray, scale: str) -> np.ndarray:
    """The linear values of ``values`` (float64): logs undone, linear scales as they are."""
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        if scale == "log1p":
            return np.expm1(x)
        if scale == "log2p1":
            return np.expm1(x * math.log(2.0))
    return x


def to_linear(block: sp.csr_matrix, decision: ScaleDecision, where: str, check: bool = True) -> sp.csr_matrix:
    """A CSR block of the input as linear float32 values (:func:`undo`). With ``check`` (and a detected scale),
    values the detection's sample did not see must agree with it (see the module docstring)."""
    data = block.data
    if check and decision.source == "detected" and data.size:
        if decision.scale == "counts" and not np.all(data == np.round(data)):
            raise ScmmError(f"{where}: holds non-integer values, but the sampled cells were all integers (read as "
                            f"raw counts): the file mixes scales; give {OPTION}")
        limit = MAX_LOG.get(decision.scale)
        if limit is not None and float(data.max()) > limit:
            raise ScmmError(f"{where}: values reach {float(data.max()):.4g}, beyond any {decision.scale} value "
                            f"(at most {limit:g}), but the sampled cells read as {decision.scale}: the file mixes "
                            f"scales; give {OPTION}")
    if decision.scale in ("counts", "normalized"):
        return block.astype(np.float32)
    linear = undo(data, decision.scale)
    if linear.size and not (np.isfinite(linear).all() and linear.max() <= FLOAT32_MAX):
        raise ScmmError(f"{where}: values up to {float(data.max()):.4g} read as {decision.scale} undo to numbers "
                        f"too large for float32; check {OPTION}")
    return sp.csr_matrix((linear.astype(np.float32), block.indices, block.indptr), shape=block.shape)


# --- detection ----------------------------------------------------------------------------------------
def sample_ranges(n_obs: int, max_cells: int = SAMPLE_CELLS, blocks: int = SAMPLE_BLOCKS) -> list[tuple[int, int]]:
    """Row ranges of the detection sample: every row of a small input, else ``blocks`` equal runs spread evenly."""
    if n_obs <= max_cells:
        return [(0, n_obs)]
    size = max_cells // blocks
    starts = np.linspace(0, n_obs - size, blocks).astype(int)
    return [(int(s), int(s) + size) for s in starts]


def _row_sums(data: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    sums = np.bincount(rows, weights=data, minlength=n_rows)
    return sums[np.bincount(rows, minlength=n_rows) > 0]


def _spread(sums: np.ndarray) -> float | None:
    if sums.size < MIN_CELLS or not np.isfinite(sums).all():
        return None if sums.size < MIN_CELLS else math.inf
    median = float(np.median(sums))
    return float((sums.max() - sums.min()) / median) if median > 0 else math.inf


def _lattice(data: np.ndarray, indptr: np.ndarray) -> tuple[float | None, float | None]:
    """(share of informative cells on the lattice, median distance to the integers) of linear values."""
    on, errors = [], []
    for r in range(len(indptr) - 1):
        v = data[indptr[r]:indptr[r + 1]]
        if v.size <= LATTICE_MIN_VALUES:
            continue
        unit = v.min()
        if not (unit > 0 and np.isfinite(unit)):
            continue
        ratio = v[v > unit] / unit
        ratio = ratio[ratio <= LATTICE_MAX_RATIO]
        if ratio.size < LATTICE_MIN_VALUES:
            continue
        dist = np.abs(ratio - np.round(ratio))
        on.append(np.mean(dist <= LATTICE_TOL) >= 0.9)
        errors.append(float(np.median(dist)))
    if not on:
        return None, None
    return float(np.mean(on)), float(np.median(errors))


def _candidate(data: np.ndarray, indptr: np.ndarray, rows: np.ndarray, scale: str) -> dict:
    linear = undo(data, scale)
    share, error = _lattice(linear, indptr)
    sums = _row_sums(linear, rows, len(indptr) - 1)
    spread = _spread(sums)
    consistent = (share is not None and share >= LATTICE_SHARE) or (spread is not None and spread <= SUM_TOL)
    misfit = min(error if share is not None and share >= LATTICE_SHARE else math.inf,
                 spread if spread is not None and spread <= SUM_TOL else math.inf)
    median = float(np.median(sums)) if sums.size and np.isfinite(sums).all() else None
    return {"lattice_share": share, "lattice_error": error, "sum_spread": spread, "sum_median": median,
            "consistent": bool(consistent), "misfit": misfit}


def _round_number(sums: np.ndarray) -> float | None:
    """The power of ten (10^3..10^7) every row sum lies within SUM_TOL of, if any."""
    if sums.size < MIN_CELLS:
        return None
    median = float(np.median(sums))
    if median <= 0:
        return None
    power = 10.0 ** round(math.log10(median))
    if 1e3 <= power <= 1e7 and np.all(np.abs(sums / power - 1) <= SUM_TOL):
        return power
    return None


def decide(block: sp.csr_matrix, where: str) -> ScaleDecision:
    """The scale of a sample of cells (a CSR block; see the module docstring for the rules)."""
    block = sp.csr_matrix(block)
    block.eliminate_zeros()
    data = block.data.astype(np.float64)
    check_values(data, where)
    indptr = block.indptr
    rows = np.repeat(np.arange(block.shape[0]), np.diff(indptr))
    sums = _row_sums(data, rows, block.shape[0])
    evidence: dict = {"cells_sampled": int(block.shape[0]), "values_sampled": int(data.size),
                      "integral": bool(np.all(data == np.round(data))), "max": float(data.max(initial=0.0)),
                      "row_sum_median": float(np.median(sums)) if sums.size else None,
                      "row_sum_spread": _spread(sums)}
    if data.size == 0:
        return ScaleDecision("counts", evidence=evidence)  # nothing expressed: nothing to convert
    if evidence["integral"]:
        power = _round_number(sums)
        if power is not None:
            raise ScmmError(f"{where}: the values are integers but every sampled cell sums to {power:.0e} (within "
                            f"{SUM_TOL:.0%}): raw counts down-sampled to one depth, or normalised values rounded "
                            f"to integers? Say which with {OPTION}")
        return ScaleDecision("counts", evidence=evidence)
    candidates = {"normalized": _candidate(data, indptr, rows, "normalized")}
    for scale, limit in MAX_LOG.items():
        if evidence["max"] <= limit:
            candidates[scale] = _candidate(data, indptr, rows, scale)
    evidence["candidates"] = candidates
    consistent = sorted((c["misfit"], name) for name, c in candidates.items() if c["consistent"])
    for c in candidates.values():
        c["misfit"] = None if not math.isfinite(c["misfit"]) else c["misfit"]
    if len(consistent) == 1 or (len(consistent) > 1 and consistent[0][0] * WIN_FACTOR < consistent[1][0]):
        return ScaleDecision(consistent[0][1], evidence=evidence)
    if not consistent and evidence["max"] > max(MAX_LOG.values()):
        evidence["rule"] = "beyond every log"  # non-integers above every log's range can only be linear
        return ScaleDecision("normalized", evidence=evidence)
    what = ("fit several scales equally well (" + ", ".join(n for _, n in consistent) + ")" if consistent else
            "are not integers, yet fit no linear normalisation nor log of one (no per-cell count lattice, no "
            "constant cell totals)")
    raise ScmmError(f"{where}: cannot tell the scale of the expression values: they {what}; "
                    f"{ScaleDecision('?', evidence=evidence).evidence_text()}; give {OPTION}")


def check_scale_option(input_scale: str | None) -> str:
    """``auto`` (or None) or one of :data:`SCALES`; anything else is an error."""
    value = "auto" if input_scale is None else str(input_scale)
    if value != "auto" and value not in SCALES:
        raise ScmmError(f"--input-scale must be auto, {', '.join(SCALES)}, not '{value}'")
    return value


def detect_scale(source, input_scale: str | None = "auto") -> ScaleDecision:
    """The scale of a chunked source (:class:`scmm.data_pipeline.h5ad.H5adSource` or the reader's in-memory one):
    ``input_scale`` when given (one of :data:`SCALES`), else detected from a bounded sample (module docstring)."""
    option = check_scale_option(input_scale)
    if option != "auto":
        return ScaleDecision(option, source="given")
    blocks = [as_csr(b) for b in source.read_rows(sample_ranges(source.n_obs))]
    return decide(sp.vstack(blocks, format="csr"), str(source.path))
