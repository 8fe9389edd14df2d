"""Annotation and text-generation metrics, the confusion-matrix plot, and the 'unknown' threshold.

* :func:`annotation_metrics`: accuracy, macro-F1 over the classes present in ``y_true`` (a prediction outside
  them, ``'unknown'`` included, is simply wrong), the mean ontology path score and mean PPR similarity
  (:mod:`eval.ontology_score`), and a per-class table.
* :func:`choose_unknown_threshold` picks, on the **validation** split only, the similarity threshold below
  which a cell is called ``'unknown'``. Criterion ``'decision'`` (default): maximise the fraction of correct
  decisions, ``(kept and correct + abstained and wrong) / n``, i.e. abstain exactly where the prediction would
  be wrong; criterion ``'accuracy'``: maximise the accuracy of the kept cells. Both only consider thresholds
  that keep at least ``min_coverage`` of the cells; ties go to the lowest threshold (fewest abstentions).
  Candidate thresholds are ``-inf`` (keep all) and the midpoints between consecutive distinct scores.
* :func:`expected_calibration_error`: the standard top-label ECE with ``n_bins`` (15) equal-width confidence bins
  over [0, 1] (a confidence of exactly 0 goes to the first bin, bin ``b`` holds ``(b/n, (b+1)/n]``):
  ``sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|``; empty bins count 0.
* :func:`binary_auroc`: the area under the ROC curve of a score separating positives from negatives (the
  Mann-Whitney statistic; ties count one half).
* :func:`lineage_accuracy`: share of answers that are the truth or one of its ancestors in the Cell Ontology.
* :func:`text_generation_metrics`: sacrebleu corpus BLEU-2 and BLEU-4 (default ``13a`` tokenisation,
  exponential smoothing) divided by 100, and rouge-score ROUGE-1/2/L F-measures (Porter stemming) averaged
  over pairs; all in [0, 1].
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
from matplotlib.figure import Figure

from scmm.data_pipeline.ontology import Ontology
from scmm.eval.ontology_score import is_same_or_ancestor, mean_pair_score

__all__ = ["expected_calibration_error", "calibrated_ece", "reliability_png", "binary_auroc", "lineage_accuracy",
           "annotation_metrics", "per_class_table", "confusion_matrix_png", "choose_unknown_threshold",
           "apply_unknown", "text_generation_metrics", "UNKNOWN"]

UNKNOWN = "unknown"


def _as_str_array(values: Sequence) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


def per_class_table(y_true: Sequence, y_pred: Sequence, classes: Sequence[str],
                    names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows {label, name, precision, recall, f1, support} for ``classes`` (0 where undefined)."""
    t, p = _as_str_array(y_true), _as_str_array(y_pred)
    rows = []
    for c in classes:
        tp = int(np.sum((t == c) & (p == c)))
        n_pred, support = int(np.sum(p == c)), int(np.sum(t == c))
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"label": c, "name": (names or {}).get(c, c), "precision": precision, "recall": recall,
                     "f1": f1, "support": support})
    return rows


def _label_names(classes: Sequence[str], ontology: Ontology | None) -> dict[str, str]:
    names = {}
    for c in classes:
        try:
            names[c] = ontology.label(c) if ontology is not None and ontology.is_valid(c) else c
        except KeyError:
            names[c] = c
    return names


def annotation_metrics(y_true: Sequence, y_pred: Sequence, ontology: Ontology,
                       labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, mean ontology/PPR scores, counts and a per-class table.

    ``labels`` orders the per-class table and may add classes absent from ``y_true`` (reported, but not in
    the macro average); by default the sorted classes of ``y_true``. ``macro_f1`` always averages over the
    classes present in ``y_true``.
    """
    t, p = _as_str_array(y_true), _as_str_array(y_pred)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} labels, y_pred {len(p)}")
    if len(t) == 0:
        raise ValueError("no cells to score")
    present = sorted(set(t.tolist()))
    classes = list(dict.fromkeys([str(c) for c in labels])) if labels is not None else present
    classes += [c for c in present if c not in classes]
    names = _label_names(classes, ontology)
    table = per_class_table(t, p, classes, names)
    present_set = set(present)
    return {
        "accuracy": float(np.mean(t == p)),
        "macro_f1": float(np.mean([r["f1"] for r in table if r["label"] in present_set])),
        "ontology_score": mean_pair_score(t, p, ontology, "path"),
        "ppr_score": mean_pair_score(t, p, ontology, "ppr"),
        "n_cells": int(len(t)),
        "n_classes": len(present),
        "unknown_rate": float(np.mean(p == UNKNOWN)),
        "per_class": table,
    }


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (module docstring)."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1 or len(c) == 0:
        raise ValueError("confidence and correct must be 1-D, non-empty and of equal length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    bins = _bins(c, n_bins)
    ece = 0.0
    for b in np.unique(bins):
        sel = bins == b
        ece += sel.sum() / len(c) * abs(y[sel].mean() - c[sel].mean())
    return float(ece)


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def calibrated_ece(confidence: Sequence[float], n_bins: int = 15, n_draws: int = 2000, seed: int = 0
                   ) -> tuple[float, float, float]:
    """(mean, 10th, 90th percentile) of the ECE that a *perfectly calibrated* model with these confidences shows on
    this many cells: each answer drawn right with probability its confidence, ``n_draws`` times. The ECE measured on
    ``n`` cells is inflated by sampling noise (about ``sqrt(1 / n)``); this is that floor, against which a measured
    ECE says whether the model is miscalibrated at all."""
    c = np.asarray(confidence, dtype=np.float64)
    if c.ndim != 1 or len(c) == 0:
        raise ValueError("confidence must be 1-D and non-empty")
    bins = _bins(c, n_bins)
    draws = np.random.default_rng(seed).random((n_draws, len(c))) < c
    ece = np.zeros(n_draws)
    for b in np.unique(bins):
        sel = bins == b
        ece += sel.sum() / len(c) * np.abs(draws[:, sel].mean(1) - c[sel].mean())
    return float(ece.mean()), float(np.quantile(ece, 0.1)), float(np.quantile(ece, 0.9))


def reliability_png(confidence: Sequence[float], correct: Sequence[bool], path: str | Path, n_bins: int = 15,
                    title: str = "Reliability (test split)") -> Path:
    """Accuracy against confidence per bin (the bins of :func:`expected_calibration_error`), each bin's share of the
    cells as the bar width's shade, beside the diagonal of perfect calibration."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    bins = _bins(c, n_bins)
    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.subplots()
    width = 1.0 / n_bins
    for b in np.unique(bins):
        sel = bins == b
        share = sel.sum() / len(c)
        ax.bar(b * width, y[sel].mean(), width=width, align="edge", color="tab:blue", edgecolor="white",
               alpha=0.35 + 0.65 * min(1.0, share * n_bins / 2))
        ax.plot(c[sel].mean(), y[sel].mean(), "o", color="black", markersize=3)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (bin; dot: mean confidence)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}, {len(c)} cells", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def binary_auroc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(equal); NaN when a side is empty."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    equal = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (len(pos) * len(neg)))


def lineage_accuracy(y_true: Sequence, y_pred: Sequence, ontology: Ontology) -> float:
    """Share of predictions that are the true CL term or one of its ancestors (``unknown`` counts wrong)."""
    t, p = _as_str_array(y_true), _as_str_array(y_pred)
    if len(t) != len(p) or len(t) == 0:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    memo: dict[tuple[str, str], bool] = {}
    hits = 0
    for a, b in zip(p.tolist(), t.tolist()):
        if (a, b) not in memo:
            memo[(a, b)] = is_same_or_ancestor(a, b, ontology)
        hits += memo[(a, b)]
    return float(hits / len(t))


def confusion_matrix_png(y_true: Sequence, y_pred: Sequence, labels: Sequence[str], names: Sequence[str] | None,
                         path: str | Path, title: str = "Confusion matrix (rows: true, normalised)") -> Path:
    """Row-normalised confusion matrix as a PNG; predictions outside ``labels`` go to an extra 'other' column."""
    t, p = _as_str_array(y_true), _as_str_array(y_pred)
    labels = [str(c) for c in labels]
    names = list(names) if names is not None else labels
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names for {len(labels)} labels")
    index = {c: i for i, c in enumerate(labels)}
    extra = bool(np.any([x not in index for x in p]))
    n_rows, n_cols = len(labels), len(labels) + int(extra)
    counts = np.zeros((n_rows, n_cols))
    for tt, pp in zip(t, p):
        if tt in index:
            counts[index[tt], index.get(pp, n_cols - 1)] += 1
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    col_names = names + (["other / unknown"] if extra else [])
    size = max(4.0, 0.45 * n_cols + 3.0)
    fig = Figure(figsize=(size, max(3.5, 0.45 * n_rows + 2.5)))  # no pyplot: no global state, no backend change
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fontsize = 8 if n_cols <= 30 else 6
    ax.set_xticks(range(n_cols), col_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n_rows), names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if n_cols <= 25:
        for i in range(n_rows):
            for j in range(n_cols):
                if counts[i, j]:
                    ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=fontsize - 1,
                            color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def choose_unknown_threshold(val_scores: Sequence[float], val_correct: Sequence[bool], criterion: str = "decision",
                             min_coverage: float = 0.0) -> float:
    """Threshold chosen on validation cells: a cell whose score is ``< threshold`` is called unknown.

    See the module docstring for the criteria. Returns ``-inf`` when keeping every cell is best.
    """
    s = np.asarray(val_scores, dtype=np.float64)
    c = np.asarray(val_correct, dtype=bool)
    if s.shape != c.shape or s.ndim != 1:
        raise ValueError("val_scores and val_correct must be 1-D and of equal length")
    if len(s) == 0:
        raise ValueError("no validation cells to choose a threshold on")
    if criterion not in ("decision", "accuracy"):
        raise ValueError(f"criterion must be 'decision' or 'accuracy', got {criterion!r}")
    order = np.argsort(s, kind="stable")
    s, c = s[order], c[order]
    distinct = np.unique(s)
    candidates = np.concatenate([[-np.inf], (distinct[:-1] + distinct[1:]) / 2.0])
    n = len(s)
    n_abstain = np.searchsorted(s, candidates, side="left")  # cells with score < threshold
    wrong_cum = np.concatenate([[0], np.cumsum(~c)])
    correct_total = int(c.sum())
    abstained_wrong = wrong_cum[n_abstain]
    kept_correct = correct_total - (n_abstain - abstained_wrong)
    kept = n - n_abstain
    if criterion == "decision":
        value = (kept_correct + abstained_wrong) / n
    else:
        value = np.where(kept > 0, kept_correct / np.maximum(kept, 1), -1.0)
    value = np.where(kept / n >= min_coverage - 1e-12, value, -np.inf)
    best = int(np.argmax(value))  # first maximum = lowest threshold
    return float(candidates[best])


def apply_unknown(pred: Sequence, scores: Sequence[float], threshold: float, unknown: str = UNKNOWN) -> np.ndarray:
    """Predictions with ``unknown`` where ``score < threshold`` (object array)."""
    p = np.asarray(list(pred), dtype=object).copy()
    s = np.asarray(scores, dtype=np.float64)
    if p.shape != s.shape:
        raise ValueError(f"{len(p)} predictions for {len(s)} scores")
    p[s < threshold] = unknown
    return p


def repeated_phrase_rate(texts: Sequence[str], n: int = 4) -> float:
    """Share of ``texts`` in which some phrase of ``n`` words occurs twice or more (case and punctuation ignored):
    a fluency check that needs no reference, since a language model that lost the thread repeats itself."""
    if not texts:
        raise ValueError("no texts to score")
    hits = 0
    for text in texts:
        words = re.findall(r"[a-z0-9+-]+", str(text).lower())
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        hits += len(set(grams)) < len(grams)
    return hits / len(texts)


def text_generation_metrics(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """BLEU-2/4 (sacrebleu corpus BLEU / 100) and mean ROUGE-1/2/L F-measure of ``hyps`` against ``refs``."""
    from rouge_score import rouge_scorer  # noqa: PLC0415 - rouge_score takes ~1 s to import; only stage 2 needs it

    hyps, refs = [str(h) for h in hyps], [str(r) for r in refs]
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    if not hyps:
        raise ValueError("no texts to score")
    out = {}
    for order in (2, 4):
        bleu = sacrebleu.metrics.BLEU(max_ngram_order=order)
        out[f"bleu{order}"] = float(bleu.corpus_score(hyps, [refs]).score / 100.0)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hyps, refs):
        scores = scorer.score(r, h)  # score(target, prediction)
        for key in sums:
            sums[key] += scores[key].fmeasure
    out.update({key: float(v / len(hyps)) for key, v in sums.items()})
    return out
