"""Calibrated confidence, abstention ("unknown") and ontology back-off for annotation by text.

Annotation by text scores each cell against each candidate label by the cosine similarity ``s`` of the cell
embedding and the label's text prototype (:mod:`scmm.eval.annotate`). Three values, all chosen by ``scmm eval``
on the corpus's **val** split (cells of the training types only: held-out types never reach val), turn those
scores into answers:

* **Temperature** ``T`` (:func:`fit_temperature`): ``p = softmax(s / T)`` over the candidate labels, with the one
  ``T`` that minimises the negative log-likelihood of the val cells' true labels (temperature scaling, Guo et al.
  2017). The NLL of ``softmax(b * s)`` is convex in the inverse temperature ``b = 1/T``, so a bounded 1-D search
  (Brent's method on ``log T`` in :data:`T_BOUNDS`) finds the global minimum. ``scmm_confidence`` is ``p`` of the
  top-1 label: a calibrated probability that the top-1 label is the cell's type.
* **Abstention threshold** (:func:`abstention_threshold`): for a stated rate ``r`` (default
  :data:`DEFAULT_UNKNOWN_RATE` = 0.05), the threshold is the ``(k+1)``-th smallest val confidence with
  ``k = floor(r * n)``; a cell whose confidence is *below* it is ``unknown``. At most ``k <= r * n`` val cells
  abstain (fewer with ties), and, split-conformal style, a new cell exchangeable with the val cells abstains with
  probability at most ``k / (n + 1) <= r``. ``r = 0`` gives threshold 0 (never abstain). The val confidences are
  also stored as quantiles (:func:`confidence_quantiles`, every 0.5 %) so that ``scmm annotate --unknown-rate``
  can pick another rate later without the val cells (:func:`threshold_from_quantiles`, linear interpolation).
* **Back-off margin** (:func:`choose_margin`): when the top-1 and top-2 candidates are too close to call
  (``p_top1 - p_top2 < margin``), the answer is their lowest informative common ancestor in the Cell Ontology
  (:func:`scmm.eval.ontology_score.informative_common_ancestor`: never a generic term such as ``cell``), and the
  *level* is the number of ontology steps from the top-1 label up to it (0: the top-1 label itself, as when the
  top-1 is an ancestor of the top-2). When the two share no informative ancestor, or one of them is not a CL
  term, the answer stays the top-1 label (level 0): back-off never answers a generic term. Only the top two
  candidates take part: on the demo, the common ancestor of *every* candidate within the margin was
  ``hematopoietic cell`` for a third of the test cells (three close candidates often span the lymphoid and
  myeloid lineages), while the top two gave ``T cell``-like answers at about the same lineage accuracy. The
  margin chosen is the smallest one whose val *lineage accuracy with back-off* (the answer is the truth or one
  of its ancestors) reaches :data:`DEFAULT_LINEAGE_TARGET` = 0.95, among margins that back off at most
  :data:`MAX_BACKOFF_RATE` of the
  val cells; when none reaches the target, the margin of the highest such accuracy (the smallest on ties).
  Margin 0 never backs off. Candidate margins are 0 and just above each val cell's top-1/top-2 gap (at most
  :data:`MARGIN_GRID` of them, quantiles of those gaps).

Order at inference (:func:`calibrated_answers`): probabilities; a cell whose top-1 confidence is below the
threshold is ``unknown``; the other cells get the top-1 label or its back-off. The confidence stays the top-1
probability (abstention and the seen/unseen AUROC read it).

Where the values live: ``scmm eval`` writes them into ``metrics.json`` under ``annotation`` (``temperature``,
``threshold``, ``unknown_rate``, ``margin``) and ``annotation.calibration`` (the same plus the val confidence
quantiles; :meth:`Calibration.to_dict`). ``scmm package --metrics`` copies that file into the model folder, and
``scmm annotate`` on the packaged model reads it (:meth:`Calibration.from_metrics`). A model folder without those
keys (packaged before, or a bare stage-1/2 folder) keeps the earlier behaviour: ``T = 1 / logit_scale`` (the
model's contrastive temperature), no default abstention and no back-off.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from scmm.data_pipeline.ontology import Ontology
from scmm.errors import ScmmError
from scmm.eval.ontology_score import informative_common_ancestor, is_same_or_ancestor

__all__ = ["softmax", "nll", "fit_temperature", "abstention_threshold", "confidence_quantiles",
           "threshold_from_quantiles", "backoff", "choose_margin", "Calibration", "calibrated_answers", "Answers",
           "check_unknown_options", "DEFAULT_UNKNOWN_RATE", "DEFAULT_LINEAGE_TARGET", "UNKNOWN"]

UNKNOWN = "unknown"
DEFAULT_UNKNOWN_RATE = 0.05
DEFAULT_LINEAGE_TARGET = 0.95
MAX_BACKOFF_RATE = 0.5
MARGIN_GRID = 200
QUANTILE_STEP = 0.005
T_BOUNDS = (1e-4, 1e3)


# --- temperature ------------------------------------------------------------------------------------
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` (column indices) under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    log_norm = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: Sequence[int], bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature ``T`` minimising :func:`nll` of ``labels`` (one column index per row of ``logits``).

    Bounded Brent search on ``log T`` within ``bounds`` (the NLL is convex in ``1/T``, so unimodal in
    ``log T``). ``ValueError`` on empty input, a label outside the columns or non-finite logits.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or y.shape != (len(x),) or len(x) == 0:
        raise ValueError("fit_temperature needs logits [n, c] and n labels, n > 0")
    if (y < 0).any() or (y >= x.shape[1]).any():
        raise ValueError("a label is outside the logits' columns")
    if not np.isfinite(x).all():
        raise ValueError("non-finite logits")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    res = minimize_scalar(lambda t: nll(x, y, math.exp(t)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-7})
    return float(math.exp(res.x))


# --- abstention -------------------------------------------------------------------------------------
def abstention_threshold(confidence: Sequence[float], rate: float) -> float:
    """The confidence below which a cell is ``unknown``, so that at most ``rate`` of these (val) cells abstain:
    the ``(k+1)``-th smallest confidence, ``k = floor(rate * n)`` (module docstring); 0 for ``rate = 0``."""
    c = np.sort(np.asarray(confidence, dtype=np.float64))
    if c.ndim != 1 or len(c) == 0:
        raise ValueError("no confidences to choose a threshold on")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the unknown rate must be in [0, 1), got {rate}")
    k = int(math.floor(rate * len(c) + 1e-9))
    return 0.0 if k == 0 else float(c[k])


def confidence_quantiles(confidence: Sequence[float], step: float = QUANTILE_STEP) -> list[float]:
    """Quantiles of the (val) confidences at rates ``0, step, ..., 1`` (``np.quantile``, linear)."""
    c = np.asarray(confidence, dtype=np.float64)
    rates = np.linspace(0.0, 1.0, int(round(1.0 / step)) + 1)
    return [float(q) for q in np.quantile(c, rates)]


def threshold_from_quantiles(quantiles: Sequence[float], rate: float) -> float:
    """The threshold for ``rate`` read off stored :func:`confidence_quantiles` (linear interpolation; 0 for
    ``rate = 0``)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the unknown rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0.0
    q = np.asarray(quantiles, dtype=np.float64)
    return float(np.interp(rate, np.linspace(0.0, 1.0, len(q)), q))


def check_unknown_options(unknown_rate: float | None, unknown_threshold: float | None) -> None:
    """``ScmmError`` for an ``--unknown-rate`` outside [0, 1), a threshold outside [0, 1] (NaN included), or both."""
    if unknown_rate is not None and unknown_threshold is not None:
        raise ScmmError("give --unknown-rate or --unknown-threshold, not both")
    if unknown_rate is not None and not 0.0 <= unknown_rate < 1.0:
        raise ScmmError(f"--unknown-rate must be in [0, 1), got {unknown_rate}")
    if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
        raise ScmmError(f"--unknown-threshold must be a confidence in [0, 1], got {unknown_threshold}")


# --- back-off ---------------------------------------------------------------------------------------
def backoff(prob: np.ndarray, cl_ids: Sequence[str], margin: float, ontology: Ontology,
            cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: (answer CL ID, or "" to keep the top-1 label; level). See the module docstring."""
    p = np.asarray(prob, dtype=np.float64)
    ids = list(cl_ids)
    answer = np.full(len(p), "", dtype=object)
    level = np.zeros(len(p), dtype=np.int64)
    if margin <= 0 or len(p) == 0 or p.shape[1] < 2:
        return answer, level
    cache = {} if cache is None else cache
    order = np.argsort(-p, axis=1, kind="stable")[:, :2]
    first, second = order[:, 0], order[:, 1]
    rows = np.arange(len(p))
    for i in np.flatnonzero(p[rows, first] - p[rows, second] < margin):
        key = (int(first[i]), int(second[i]))
        if key not in cache:
            terms = [ids[j] for j in key]
            cache[key] = informative_common_ancestor(terms, ontology) if all(terms) else None
        found = cache[key]
        if found is not None and found[0] != ids[first[i]]:
            answer[i], level[i] = found
    return answer, level


def _lineage_hits(prob: np.ndarray, cl_ids: Sequence[str], truth: Sequence[str], margin: float,
                  ontology: Ontology, cache: dict) -> tuple[float, float]:
    """(lineage accuracy with back-off at ``margin``, share backed off) over these cells."""
    answer, level = backoff(prob, cl_ids, margin, ontology, cache)
    keys = np.asarray(list(cl_ids), dtype=object)[prob.argmax(1)]
    final = np.where(answer != "", answer, keys)
    hits = [is_same_or_ancestor(str(a), str(t), ontology) for a, t in zip(final, truth)]
    return float(np.mean(hits)), float(np.mean(answer != ""))


def choose_margin(prob: np.ndarray, cl_ids: Sequence[str], truth: Sequence[str], ontology: Ontology,
                  target: float = DEFAULT_LINEAGE_TARGET, max_backoff: float = MAX_BACKOFF_RATE) -> float:
    """The back-off margin chosen on (val) cells: see the module docstring. ``truth``: the cells' CL IDs."""
    p = np.asarray(prob, dtype=np.float64)
    if len(p) == 0 or p.shape[1] < 2:
        return 0.0
    s = np.sort(p, axis=1)
    gaps = s[:, -1] - s[:, -2]
    grid = np.unique(np.quantile(gaps, np.linspace(0.0, 1.0, min(MARGIN_GRID, len(gaps)))))
    margins = [0.0] + [float(np.nextafter(g, np.inf)) for g in grid]
    cache: dict = {}
    best, best_acc = 0.0, -1.0
    for m in margins:
        acc, rate = _lineage_hits(p, cl_ids, truth, m, ontology, cache)
        if rate > max_backoff + 1e-12:
            break  # margins only grow: every later one backs off more
        if acc >= target - 1e-12:
            return m
        if acc > best_acc + 1e-12:
            best, best_acc = m, acc
    return best


# --- the stored values and the answers --------------------------------------------------------------
@dataclass
class Calibration:
    """What ``scmm eval`` chose on val and ``scmm annotate`` applies (module docstring)."""

    temperature: float
    threshold: float = 0.0  # confidence below which a cell is unknown (0: never)
    unknown_rate: float | None = None  # the rate the threshold was chosen for (None: set directly)
    margin: float = 0.0  # back-off margin on calibrated probabilities (0: never)
    quantiles: list[float] = field(default_factory=list)  # val confidences at rates 0, 0.005, ..., 1
    n_val_cells: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "threshold": self.threshold, "unknown_rate": self.unknown_rate,
                "margin": self.margin, "confidence_quantiles": list(self.quantiles), "n_val_cells": self.n_val_cells}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any] | None) -> Calibration | None:
        """The calibration in a ``metrics.json`` dict (``annotation.calibration``), or None when it has none."""
        c = ((metrics or {}).get("annotation") or {}).get("calibration")
        if not isinstance(c, Mapping) or "temperature" not in c:
            return None
        return cls(temperature=float(c["temperature"]), threshold=float(c.get("threshold", 0.0)),
                   unknown_rate=c.get("unknown_rate"), margin=float(c.get("margin", 0.0)),
                   quantiles=[float(q) for q in c.get("confidence_quantiles", [])],
                   n_val_cells=int(c.get("n_val_cells", 0)))

    def with_options(self, unknown_rate: float | None, unknown_threshold: float | None) -> Calibration:
        """A copy whose threshold follows ``--unknown-rate`` (from the stored quantiles) or ``--unknown-threshold``."""
        check_unknown_options(unknown_rate, unknown_threshold)
        out = Calibration(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if unknown_threshold is not None:
            out.threshold, out.unknown_rate = float(unknown_threshold), None
        elif unknown_rate is not None:
            if not self.quantiles:
                raise ScmmError("--unknown-rate needs the val confidences that scmm eval stores with the model "
                                "(package it with the metrics.json of this scmm's eval), or pass --unknown-threshold")
            out.threshold, out.unknown_rate = threshold_from_quantiles(self.quantiles, unknown_rate), unknown_rate
        return out


@dataclass
class Answers:
    """Per cell: the answer's candidate key (or back-off CL ID, or ``unknown``), display name, CL ID, calibrated
    top-1 confidence, back-off level, and the top-1 candidate index."""

    keys: np.ndarray
    names: np.ndarray
    cl_ids: np.ndarray
    confidence: np.ndarray
    level: np.ndarray
    top: np.ndarray
    prob: np.ndarray

    @property
    def unknown(self) -> np.ndarray:
        return self.keys == UNKNOWN


def calibrated_answers(sim: np.ndarray, keys: Sequence[str], names: Sequence[str], cl_ids: Sequence[str],
                       calibration: Calibration, ontology: Ontology, prob: np.ndarray | None = None) -> Answers:
    """The answers for similarities ``sim`` [N, C] to the candidates (``prob``: already computed probabilities,
    e.g. smoothed over neighbours; default ``softmax(sim / T)``)."""
    p = softmax(sim, calibration.temperature) if prob is None else np.asarray(prob, dtype=np.float64)
    top = p.argmax(1) if len(p) else np.zeros(0, dtype=np.int64)
    conf = p[np.arange(len(p)), top] if len(p) else np.zeros(0)
    out_keys = np.asarray(list(keys), dtype=object)[top]
    out_names = np.asarray(list(names), dtype=object)[top]
    out_ids = np.asarray(list(cl_ids), dtype=object)[top]
    answer, level = backoff(p, cl_ids, calibration.margin, ontology)
    up = answer != ""
    for term in set(answer[up]):
        sel = answer == term
        out_keys[sel], out_ids[sel], out_names[sel] = term, term, ontology.label(term)
    unknown = conf < calibration.threshold
    out_keys[unknown], out_names[unknown], out_ids[unknown], level[unknown] = UNKNOWN, UNKNOWN, UNKNOWN, 0
    return Answers(out_keys, out_names, out_ids, conf.astype(np.float64), level, top, p)
