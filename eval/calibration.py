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
  :data:`DEFAULT_UNKNOWN_RATE` = 0.05), the threshold is the ``j``-th smallest of the ``n`` val confidences with
  ``j = floor(r * (n + 1))`` (split conformal); a cell whose confidence is *below* it is ``unknown``. A new cell
  exchangeable with the val cells is below the ``j``-th smallest of them exactly when it ranks among the ``j``
  lowest of all ``n + 1``, so it abstains with probability at most ``j / (n + 1) <= r`` (the guarantee the rate
  states), and at most ``j - 1 < r * n`` val cells abstain (fewer with ties). ``j = 0`` (``r < 1 / (n + 1)``, or
  ``r = 0``) gives threshold 0: never abstain. With few val cells the guarantee costs power: at ``n = 69`` and
  ``r = 0.025`` the threshold is the smallest val value, and a new in-distribution cell abstains with
  probability 1/70. The val confidences are also stored as quantiles (:func:`confidence_quantiles`, every
  0.5 %) so that ``scmm annotate --unknown-rate`` can pick another rate later without the val cells
  (:func:`threshold_from_quantiles`, linear interpolation: about ``r``, without the exact bound).
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

* **Novelty check** (:func:`novelty_threshold`): a softmax over the known candidates cannot say "none of
  these", so a cell of a type the model never saw often gets a confident known answer. Beside the confidence,
  each cell's *novelty similarity* (:mod:`scmm.eval.novelty`: the mean cosine similarity of its expression
  profile's PCA point to its nearest training cells') says how unlike every training cell it is. Low similarity
  = novel. The check is model-free (a PCA of expression fitted on the train split), so its threshold is
  calibrated on the **train** split itself rather than on the few val cells: every training cell of the half
  of the donors the PCA was not fitted on scores its similarity to the *other* training cells, its own donor left
  out (its own dataset without donors, itself without either; :func:`scmm.eval.novelty.calibrated_novelty` says
  why half). Split-conformal again, the novelty threshold is the ``j``-th smallest of those ``n`` calibration
  values for the novelty share of the rate (``j = floor(r (n + 1))``), and a cell whose similarity is *below*
  it is ``unknown``. On the demo that is about 275 values instead of 69 val values, so the cut sits where the
  rate says instead of at the smallest val value. Val (cells neither the PCA nor the reference holds) checks
  that the stated rate holds: ``annotation.val_abstain_rate`` beside the target ``annotation.unknown_rate``.
* **Data far from anything seen** (:func:`novelty_summary`): beside the per-cell rule, a file (or chunk) whose
  cells are, as a whole, unlike the training cells (at least :data:`FOREIGN_SHARE` of them below the novelty
  threshold, where about the novelty rate is expected) is said to be foreign: ``scmm annotate`` logs it once with
  the share and writes the summary to ``uns['scmm']['novelty_summary']``.
* **How the rate is split** (:func:`split_rate`): with a novelty reference, each criterion gets half of the stated
  rate ``r`` (:data:`NOVELTY_SHARE` = 0.5; ``scmm eval --novelty-share S`` gives the novelty check ``S r`` and the
  confidence ``(1 - S) r``; the share is stored and ``--unknown-rate`` at annotation splits the same way): the
  confidence threshold at ``r/2`` and the novelty threshold at ``r/2`` of the val cells. A cell abstains when
  *either* is below its threshold, so a new in-distribution cell abstains with probability at most ``r/2 + r/2 = r``
  (a union bound: no assumption on how the two scores relate; any share adds up the same way), and fewer than
  ``r n`` val cells abstain. Half each is the choice that needs no data the val split cannot give: val holds no unseen
  type, so it cannot say which criterion catches them better. Equivalently, with ``q_c`` and ``q_n`` the cell's
  ranks among the val confidences and similarities (:func:`abstention_score`), a cell abstains (half each) when
  ``min(q_c, q_n) < r/2``: that rank is the *abstention score* whose seen/unseen AUROC ``scmm eval`` reports as
  ``annotation.unseen.auroc`` (``auroc_confidence`` and ``auroc_novelty`` beside it). ``r = 0`` turns both checks
  off (never abstain). ``--unknown-threshold C`` sets the confidence threshold directly and turns the novelty check
  off (a threshold the user states is the whole rule). Without a reference (a bare model folder, a package from an
  earlier scmm, ``--labels``) only the confidence counts, at the whole rate.

Order at inference (:func:`calibrated_answers`): probabilities; a cell whose top-1 confidence is below the
threshold, or whose novelty similarity is below the novelty threshold, is ``unknown``; the other cells get the
top-1 label or its back-off. ``scmm_confidence`` stays the calibrated top-1 probability.

Where the values live: ``scmm eval`` writes them into ``metrics.json`` under ``annotation`` (``temperature``,
``threshold``, ``unknown_rate``, ``margin``, ``novelty_threshold``) and ``annotation.calibration`` (the same plus
the val confidence quantiles, the novelty calibration values' quantiles, what they left out, and the reference's
size and sha256; :meth:`Calibration.to_dict`), and
the novelty reference (:class:`scmm.eval.novelty.ExpressionNovelty`) into ``novelty_reference.npz`` beside
``metrics.json``.
``scmm package --metrics`` copies both into the model folder, and ``scmm annotate`` on the packaged model reads
them (:meth:`Calibration.from_metrics`, ``ScmmModel.novelty_reference``). A model folder without those
keys (packaged before, or a bare stage-1/2 folder) keeps the earlier behaviour: ``T = 1 / logit_scale`` (the
model's contrastive temperature), no default abstention and no back-off.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from scmm.data_pipeline.ontology import Ontology
from scmm.errors import ScmmError
from scmm.eval.ontology_score import informative_common_ancestor, is_same_or_ancestor

__all__ = ["novelty_threshold", "novelty_summary", "describe_novelty_summary", "report_novelty", "FOREIGN_SHARE",
           "split_rate",
           "abstention_score", "NOVELTY_SHARE", "softmax", "nll", "fit_temperature",
           "abstention_threshold", "below_cut_left_out", "confidence_quantiles",
           "threshold_from_quantiles", "backoff", "choose_margin", "Calibration", "calibrated_answers", "Answers",
           "check_unknown_options", "DEFAULT_UNKNOWN_RATE", "DEFAULT_LINEAGE_TARGET", "UNKNOWN"]

log = logging.getLogger("scmm.calibration")

UNKNOWN = "unknown"
DEFAULT_UNKNOWN_RATE = 0.05
DEFAULT_LINEAGE_TARGET = 0.95
MAX_BACKOFF_RATE = 0.5
MARGIN_GRID = 200
QUANTILE_STEP = 0.005
T_BOUNDS = (1e-4, 1e3)
NOVELTY_SHARE = 0.5
FOREIGN_SHARE = 0.5  # a file with at least this share of cells below the novelty threshold is foreign


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
def _conformal_cut(values: Sequence[float], rate: float, what: str) -> float | None:
    """The ``j``-th smallest of the ``n`` ``values`` with ``j = floor(rate * (n + 1))``: a new value exchangeable
    with them falls below it with probability at most ``rate`` (module docstring); None when ``j = 0``."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"no {what} to choose a threshold on")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the unknown rate must be in [0, 1), got {rate}")
    j = int(math.floor(rate * (len(v) + 1) + 1e-9))
    return None if j == 0 else float(v[j - 1])


def abstention_threshold(confidence: Sequence[float], rate: float) -> float:
    """The confidence below which a cell is ``unknown``, so that a new cell like these (val) cells abstains with
    probability at most ``rate``:
    the ``j``-th smallest confidence, ``j = floor(rate * (n + 1))`` (module docstring); 0 (never) for ``j = 0``."""
    cut = _conformal_cut(confidence, rate, "confidences")
    return 0.0 if cut is None else cut


def below_cut_left_out(values: Sequence[float], rate: float) -> np.ndarray:
    """Per value: whether it lies below the split-conformal cut at ``rate`` chosen on the *other* values
    (leave-one-out: the ``j``-th smallest of the other ``n - 1``, ``j = floor(rate * n)``), as a new cell meets a
    cut it took no part in. The share of True is the honest estimate of the abstain rate on these cells; the cut
    chosen on all of them would count at most ``j - 1`` by construction."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    j = int(math.floor(rate * n + 1e-9)) if n > 1 else 0
    if j == 0:
        return np.zeros(n, dtype=bool)
    order = np.argsort(v, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    s = v[order]
    cut = np.where(rank < j, s[min(j, n - 1)], s[j - 1])  # the j-th smallest once the value itself is left out
    return v < cut


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


# --- novelty ----------------------------------------------------------------------------------------
def novelty_threshold(similarity: Sequence[float], rate: float) -> float | None:
    """The novelty similarity below which a cell is ``unknown``, so that a new cell like these (calibration) cells falls
    below it with probability at most ``rate``: the ``j``-th smallest, ``j = floor(rate * (n + 1))``; None (no
    check) when ``j = 0``."""
    return _conformal_cut(similarity, rate, "similarities")


def novelty_summary(similarity: Sequence[float], threshold: float | None, rate: float | None,
                    min_share: float = FOREIGN_SHARE) -> dict[str, Any] | None:
    """The global rule (module docstring): how many of a file's cells are below the novelty ``threshold``
    (``rate``: the share expected of cells like the training ones), and whether the file as a whole is foreign
    (at least ``min_share`` of its cells below it). None when no novelty check ran or there are no cells."""
    s = np.asarray(similarity, dtype=np.float64)
    if threshold is None or s.size == 0:
        return None
    novel = int(np.sum(s < threshold))
    share = novel / s.size
    return {"n_cells": int(s.size), "n_novel": novel, "novel_share": float(share),
            "expected_share": None if rate is None else float(rate), "threshold": float(threshold),
            "median_similarity": float(np.median(s)), "foreign_share": float(min_share),
            "foreign": bool(share >= min_share)}


def describe_novelty_summary(summary: Mapping[str, Any], where: str) -> str:
    """One log line for a :func:`novelty_summary` (a warning's text when the file is foreign)."""
    expected = "" if summary.get("expected_share") is None else f", about {summary['expected_share']:.1%} expected"
    head = (f"{where}: {summary['n_novel']} of {summary['n_cells']} cells ({summary['novel_share']:.1%}) are unlike "
            f"every training cell (novelty similarity below {summary['threshold']:.3g}{expected})")
    if not summary.get("foreign"):
        return head
    return (head + ": the data as a whole are unlike the model's training data (another tissue, species or assay?); "
            "those cells are called unknown, and the labels of the others deserve the same doubt")


def report_novelty(similarity: Sequence[float], calibration: Calibration, where: str,
                   ignore: np.ndarray | None = None) -> dict[str, Any] | None:
    """The global rule at annotation: :func:`novelty_summary` of a file's cells (``ignore``: cells left out, e.g.
    those expressing no model gene) against ``calibration``'s novelty threshold, logged once (a warning when the
    file as a whole is foreign); what goes to ``uns['scmm']['novelty_summary']``. None without a novelty check."""
    s = np.asarray(similarity, dtype=np.float64)
    if ignore is not None:
        s = s[~np.asarray(ignore, dtype=bool)]
    rate = None
    if calibration.unknown_rate is not None:
        rate = split_rate(calibration.unknown_rate, calibration.novelty_share)[1]
    summary = novelty_summary(s, calibration.novelty_threshold, rate)
    if summary is not None:
        (log.warning if summary["foreign"] else log.info)("%s", describe_novelty_summary(summary, where))
    return summary


def split_rate(rate: float, share: float | None) -> tuple[float, float]:
    """(confidence rate, novelty rate) for a stated unknown ``rate`` (module docstring): ``share`` of it to the
    novelty check (default :data:`NOVELTY_SHARE`, half), the rest to the confidence; all to the confidence when
    ``share`` is None (no novelty reference)."""
    if share is None:
        return float(rate), 0.0
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the novelty share must be in [0, 1], got {share}")
    return float(rate) * (1.0 - share), float(rate) * share


def _rank(values: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """Each value's position among the val values whose quantiles (at rates 0..1) are given, in [0, 1]."""
    q = np.asarray(quantiles, dtype=np.float64)
    rates = np.linspace(0.0, 1.0, len(q))
    lo = np.searchsorted(q, values, side="left")  # ties among the quantiles: the lowest rate
    hi = np.clip(lo, 1, len(q) - 1)
    q0, q1 = q[hi - 1], q[hi]
    frac = np.where(q1 > q0, (values - q0) / np.where(q1 > q0, q1 - q0, 1.0), 0.0)
    out = rates[hi - 1] + np.clip(frac, 0.0, 1.0) * (rates[hi] - rates[hi - 1])
    return np.where(values <= q[0], 0.0, np.where(values >= q[-1], 1.0, out))


def abstention_score(confidence: np.ndarray, similarity: np.ndarray | None, calibration: Calibration) -> np.ndarray:
    """The score behind abstention (higher: more in-distribution): the smaller of the cell's ranks among the val
    confidences and among the novelty calibration values (the confidence rank alone without a novelty check).
    With the stored quantiles, ``score < r/2`` is the abstention rule at rate ``r`` (module docstring)."""
    conf = np.asarray(confidence, dtype=np.float64)
    score = _rank(conf, calibration.quantiles) if calibration.quantiles else conf
    if similarity is not None and calibration.novelty_quantiles:
        score = np.minimum(score, _rank(np.asarray(similarity, dtype=np.float64), calibration.novelty_quantiles))
    return score


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
    novelty_threshold: float | None = None  # novelty similarity below which a cell is unknown (None: no check)
    novelty_quantiles: list[float] = field(default_factory=list)  # calibration similarities at rates 0..1
    novelty_reference: dict | None = None  # {file, n_cells, n_train_cells, sha256, dtype} of the reference
    novelty_share: float = NOVELTY_SHARE  # the share of the unknown rate given to the novelty check
    novelty_calibration: dict | None = None  # {split, left_out, n_cells, n_groups} of the novelty quantiles

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "threshold": self.threshold, "unknown_rate": self.unknown_rate,
                "margin": self.margin, "confidence_quantiles": list(self.quantiles), "n_val_cells": self.n_val_cells,
                "novelty_threshold": self.novelty_threshold, "novelty_quantiles": list(self.novelty_quantiles),
                "novelty_reference": self.novelty_reference, "novelty_share": self.novelty_share,
                "novelty_calibration": self.novelty_calibration}

    @property
    def has_novelty(self) -> bool:
        """True when a novelty reference was chosen with this calibration (whether or not the check is on)."""
        return bool(self.novelty_quantiles) and self.novelty_reference is not None

    def without_novelty(self) -> Calibration:
        """A copy with no novelty check (no reference to search); the confidence threshold is kept as is."""
        out = Calibration(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.novelty_threshold, out.novelty_quantiles, out.novelty_reference = None, [], None
        out.novelty_calibration = None
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any] | None) -> Calibration | None:
        """The calibration in a ``metrics.json`` dict (``annotation.calibration``), or None when it has none."""
        c = ((metrics or {}).get("annotation") or {}).get("calibration")
        if not isinstance(c, Mapping) or "temperature" not in c:
            return None
        ref = c.get("novelty_reference")
        # a novelty check of an earlier scmm (embedding space, no "space" key) is not this one: confidence only
        ref = ref if isinstance(ref, Mapping) and ref.get("space") == "expression" else None
        return cls(temperature=float(c["temperature"]), threshold=float(c.get("threshold", 0.0)),
                   unknown_rate=c.get("unknown_rate"), margin=float(c.get("margin", 0.0)),
                   quantiles=[float(q) for q in c.get("confidence_quantiles", [])],
                   n_val_cells=int(c.get("n_val_cells", 0)),
                   novelty_threshold=(None if ref is None or c.get("novelty_threshold") is None
                                      else float(c["novelty_threshold"])),
                   novelty_quantiles=[float(q) for q in c.get("novelty_quantiles") or []] if ref else [],
                   novelty_reference=dict(ref) if ref is not None else None,
                   novelty_share=float(c.get("novelty_share", NOVELTY_SHARE)),
                   novelty_calibration=(dict(c["novelty_calibration"]) if ref is not None
                                        and isinstance(c.get("novelty_calibration"), Mapping) else None))

    def with_options(self, unknown_rate: float | None, unknown_threshold: float | None) -> Calibration:
        """A copy whose thresholds follow ``--unknown-rate`` (from the stored quantiles, split between confidence
        and novelty by :func:`split_rate`) or ``--unknown-threshold`` (the confidence threshold; the novelty check
        off)."""
        check_unknown_options(unknown_rate, unknown_threshold)
        out = Calibration(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if unknown_threshold is not None:
            out.threshold, out.unknown_rate, out.novelty_threshold = float(unknown_threshold), None, None
        elif unknown_rate is not None:
            if not self.quantiles:
                raise ScmmError("--unknown-rate needs the val confidences that scmm eval stores with the model "
                                "(package it with the metrics.json of this scmm's eval), or pass --unknown-threshold")
            conf_rate, nov_rate = split_rate(unknown_rate, self.novelty_share if self.has_novelty else None)
            out.threshold, out.unknown_rate = threshold_from_quantiles(self.quantiles, conf_rate), unknown_rate
            out.novelty_threshold = (threshold_from_quantiles(self.novelty_quantiles, nov_rate)
                                     if self.has_novelty and nov_rate > 0 else None)
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
    novel: np.ndarray | None = None  # True where the novelty check called the cell unknown (None: no check)

    @property
    def unknown(self) -> np.ndarray:
        return self.keys == UNKNOWN


def calibrated_answers(sim: np.ndarray, keys: Sequence[str], names: Sequence[str], cl_ids: Sequence[str],
                       calibration: Calibration, ontology: Ontology, prob: np.ndarray | None = None,
                       novelty: np.ndarray | None = None) -> Answers:
    """The answers for similarities ``sim`` [N, C] to the candidates (``prob``: already computed probabilities,
    e.g. smoothed over neighbours; default ``softmax(sim / T)``; ``novelty``: each cell's similarity to its
    nearest reference cell, checked against ``calibration.novelty_threshold`` when both are given)."""
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
    novel = None
    if novelty is not None and calibration.novelty_threshold is not None:
        novel = np.asarray(novelty, dtype=np.float64) < calibration.novelty_threshold
        unknown = unknown | novel
    out_keys[unknown], out_names[unknown], out_ids[unknown], level[unknown] = UNKNOWN, UNKNOWN, UNKNOWN, 0
    return Answers(out_keys, out_names, out_ids, conf.astype(np.float64), level, top, p, novel)
