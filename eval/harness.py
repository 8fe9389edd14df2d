"""One evaluation run: a model on a corpus's fixed splits -> ``metrics.json``, ``report.md``, PNGs.

    scmm eval --model DIR --corpus DIR --out DIR [--tasks annotate,retrieve] [--labels LIST|FILE]

Tasks (``TASKS``):

* **annotate**: zero-shot annotation by text on the **test** split. Candidate labels are the corpus's cell
  types (CL IDs; kept free-text labels ``unmatched:<label>`` use their label as text) or a user list
  (``labels=``): CL IDs, or free text, which is matched to a CL term by label/synonym when possible (the
  prediction is then that CL ID, and its text is the user's wording plus the CL definition) and otherwise
  predicted as the text itself (it then never matches a corpus label). Each candidate's prototype is the mean
  embedding of its phrasings (:func:`scmm.eval.annotate.label_prototypes`); a cell gets the most similar
  prototype. Scores: :func:`scmm.eval.metrics.annotation_metrics` (the per-class table goes to the report only).
  Scores are over the test cells of *seen* types (not among the corpus's held-out types; the held-out ones are
  never candidates) unless named otherwise (:func:`_annotate` lists which cells each figure is over).
  *Confidence, unknown, back-off* (:mod:`scmm.eval.calibration`): on the **val** split the harness fits the
  temperature of ``softmax(similarity / T)`` (``annotation.temperature``), sets the abstention thresholds so
  that at most ``unknown_rate`` (default 0.05) of val cells abstain, half of it on the calibrated top-1
  confidence (``annotation.threshold``; ``unknown_threshold`` sets it directly and turns the novelty check off)
  and half on the novelty similarity, how like the training cells' the cell's expression profile is
  (``annotation.novelty_threshold``; :mod:`scmm.eval.novelty`: fitted on the train split, at most
  ``scmm.eval.novelty.NOVELTY_MAX_REFERENCE`` cells, a seeded subsample beyond, written to
  ``novelty_reference.npz`` beside ``metrics.json``; its threshold is calibrated on those training cells' own
  leave-donor-out similarities, not on val), and chooses the back-off margin (``annotation.margin``);
  all of them, with the val confidence and novelty calibration quantiles, go to ``annotation.calibration``, which
  ``scmm annotate`` applies on a packaged model. ``val_abstain_rate``: the share of val cells abstaining (each
  against the confidence cut chosen on the other val cells, and the novelty cut: the check that the stated
  ``unknown_rate`` holds on cells the novelty PCA never saw;
  ``val_abstain_rate_novelty``: by the novelty check alone). ``foreign``: ``n_cells``, ``unknown_rate`` and
  ``novel_rate`` of synthetic cells made unlike the corpus (:mod:`scmm.eval.foreign`).
  On test: ``ece`` (15 bins; ``ece_floor`` with ``ece_floor_p10`` /
  ``ece_floor_p90``: what a perfectly calibrated model with the same confidences shows on as many cells,
  :func:`scmm.eval.metrics.calibrated_ece`, and ``reliability.png``), ``abstain_rate`` (and
  ``abstain_rate_novelty``, the share the novelty check alone abstains on), ``lineage_accuracy`` /
  ``lineage_accuracy_backoff`` (the answer is the truth or one of its ancestors, without / with back-off),
  ``accuracy_backoff``, ``backoff_rate``; ``with_unknown``: the final answers (abstention and back-off);
  ``unseen``: for the held-out types' test cells, ``n_cells``, ``unknown_or_ancestor_rate``, ``unknown_rate``,
  ``novel_rate``, and between seen-type (positive) and held-out-type cells the ``auroc`` of the abstention score
  (:func:`scmm.eval.calibration.abstention_score`), ``auroc_confidence`` (of the calibrated confidence) and
  ``auroc_novelty`` (of the novelty similarity).
  Plots: ``confusion_matrix.png`` and ``umap.png`` (test cell embeddings coloured by true and by predicted
  type; at most ``scmm.eval.plots.UMAP_MAX_CELLS`` cells, a seeded subsample beyond).
  **Baselines** run with annotate, fitted on train and scored on test (:mod:`scmm.eval.baselines`): ``majority``,
  ``logistic_regression``, ``pca_knn``, and ``scmm_knn_smoothing`` (scmm's test predictions smoothed over the
  k-NN graph of the test cells in expression space, with ``k`` from :func:`scmm.eval.baselines.smoothing_k`):
  ``baselines.<name> = {accuracy, macro_f1}``. The baselines are fitted on at most
  ``scmm.eval.baselines.BASELINE_MAX_TRAIN_CELLS`` train cells (a seeded subsample beyond).
* **retrieve**: :func:`scmm.eval.retrieval.retrieval_metrics` between the test cells' embeddings and the text
  features of their own texts (recall@1/5/10 both ways, mean ranks, label-level recall).
* **describe**, **generate**: stage-2 tasks (:mod:`scmm.eval.stage2`); a model without a stage-2 part cannot do
  them, so asking for them is an error.
* **language** (every run, on a corpus with per-cell facts): ``language.*`` (:mod:`scmm.eval.language`): search by
  program text in the stage-1 space always, program and marker claims of the descriptions after **describe**,
  text-to-cell by program after **generate**; on a corpus without facts ``language = {"absent": reason}``.

The model is any model folder (:func:`scmm.model.folders.load_model`); it encodes cells with its own saved
encoding. Splits come from the corpus manifest, the seed of the baselines and the UMAP from ``seed``; the model
runs in fp32 on CPU in eval mode, so the same model and corpus give the same ``metrics.json``.

Output is atomic: everything is written into a temporary folder beside ``out_dir`` and moved into place at the
end (:func:`scmm.atomic.write_folder`: a new folder in one rename; into an existing folder the files are replaced
one by one, ``metrics.json`` last, other files there are kept, and earlier outputs of this harness that the run
did not produce again are removed). Bad input (missing model or corpus, unknown task, stage-2 task, bad label) is a
:class:`~scmm.errors.ScmmError` raised before anything is written.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scmm.atomic import write_folder
from scmm.data_pipeline.collate import CP10K, log1p_normalize
from scmm.data_pipeline.hvg import hvg_panel
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus, label_keys
from scmm.errors import ScmmError
from scmm.eval.annotate import Candidates, Embedded, embed_split, label_prototypes, read_labels_option
from scmm.eval.baselines import knn_smoothing, run_corpus_baselines, smoothing_k
from scmm.eval.calibration import (
    DEFAULT_UNKNOWN_RATE,
    NOVELTY_SHARE,
    UNKNOWN,
    Calibration,
    abstention_score,
    abstention_threshold,
    below_cut_left_out,
    calibrated_answers,
    check_unknown_options,
    choose_margin,
    confidence_quantiles,
    fit_temperature,
    novelty_threshold,
    softmax,
    split_rate,
)
from scmm.eval.foreign import foreign_counts
from scmm.eval.language import language_report, type_examples
from scmm.eval.metrics import (
    annotation_metrics,
    binary_auroc,
    calibrated_ece,
    confusion_matrix_png,
    expected_calibration_error,
    lineage_accuracy,
    reliability_png,
)
from scmm.eval.novelty import (
    NOVELTY_FILE,
    NOVELTY_GENES,
    ExpressionNovelty,
    NoveltyCalibration,
    calibrated_novelty,
    split_similarity,
)
from scmm.eval.ontology_score import is_same_or_ancestor, mean_pair_score
from scmm.eval.plots import umap_png
from scmm.eval.pseudocell import REFERENCE_SPLITS, embed_profiles
from scmm.eval.report import write_report
from scmm.eval.retrieval import retrieval_metrics
from scmm.eval.stage2 import generation_report, pseudocell_evaluation
from scmm.model.folders import ScmmModel, load_model

log = logging.getLogger("scmm.eval")

TASKS = ("annotate", "retrieve", "describe", "generate")
STAGE1_TASKS = ("annotate", "retrieve")
STAGE2_TASKS = ("describe", "generate")
DEFAULT_TASKS = ("annotate", "retrieve")
PSEUDOCELLS_PER_TYPE = 20  # generated per cell type (the issue asks for at least 20)
PSEUDOCELL_K = 5
EXAMPLES = 8  # generated descriptions shown in report.md
TEXT_BATCH = 64  # texts per text-tower call: bounds the activation memory (~100 MB at 128 tokens)
BASELINE_NAMES = ("majority", "logistic_regression", "pca_knn", "scmm_knn_smoothing")
# every file this harness may write (stale ones are removed when a later run into the same folder skips them)
OUTPUT_FILES = ("metrics.json", "report.md", "confusion_matrix.png", "reliability.png", "umap.png", NOVELTY_FILE)


# --- inputs -----------------------------------------------------------------------------------------
def parse_tasks(tasks: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validated, de-duplicated task names from ``"a,b"`` or a sequence (None: the default tasks)."""
    if tasks is None:
        return DEFAULT_TASKS
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = tuple(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))
    if not out:
        raise ScmmError(f"no task given (choose from {', '.join(TASKS)})")
    unknown = [t for t in out if t not in TASKS]
    if unknown:
        raise ScmmError(f"unknown task(s) {', '.join(unknown)} (choose from {', '.join(TASKS)})")
    return out


def default_tasks(model: ScmmModel) -> tuple[str, ...]:
    """Every task the model can do: annotate and retrieve, plus describe and generate with a stage-2 part."""
    return TASKS if model.has_stage2 else DEFAULT_TASKS


# --- data -------------------------------------------------------------------------------------------
def _split_cells(corpus: Corpus, split: str) -> tuple[list[str], list[str]]:
    """(cell IDs, label keys) of a split in shard order (the order of the baselines' expression matrices)."""
    ids, labels = [], []
    for shard in corpus.iter_shards(split, columns=("cell_id", "cell_type_ontology_term_id", "cell_type")):
        ids += [str(c) for c in shard.obs["cell_id"]]
        labels += label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"])
    return ids, labels


def _embed(model, corpus: Corpus, split: str, progress: bool) -> tuple[Embedded, np.ndarray]:
    """Embedded split re-ordered into shard order, with label keys; (embedded, label keys)."""
    emb = embed_split(model, corpus, split, progress)
    ids, labels = _split_cells(corpus, split)
    if emb.cell_ids != ids:
        if len(set(ids)) != len(ids) or sorted(ids) != sorted(emb.cell_ids):
            raise ScmmError(f"cannot align the embedded cells of split '{split}' with the corpus shards")
        pos = {c: i for i, c in enumerate(emb.cell_ids)}
        order = np.array([pos[c] for c in ids])
        emb = Embedded(emb.embeddings[order], ids, [emb.labels[i] for i in order], [emb.texts[i] for i in order])
    return emb, np.asarray(labels, dtype=object)


def _text_features(model, texts: Sequence[str]) -> np.ndarray:
    """L2-normalised aligned text features of each text (each distinct text encoded once)."""
    uniq, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    parts = []
    with torch.no_grad():
        for start in range(0, len(uniq), TEXT_BATCH):
            f = model.text_features(uniq[start:start + TEXT_BATCH].tolist()).float()
            parts.append(torch.nn.functional.normalize(f, dim=-1).numpy())
    return np.concatenate(parts).astype(np.float32)[inverse]


# --- tasks ------------------------------------------------------------------------------------------
def _logit_scale(model) -> float:
    return float(model.heads.get_logit_scale().detach().float().cpu())


def _calibrate(model, corpus: Corpus, protos: np.ndarray, cands: Candidates, ontology, progress: bool,
               unknown_rate: float, unknown_threshold: float | None, notes: list[str],
               novelty: tuple[ExpressionNovelty, NoveltyCalibration] | None = None,
               novelty_share: float = NOVELTY_SHARE) -> tuple[Calibration, dict]:
    """Temperature, confidence threshold and back-off margin chosen on the val cells whose type is a candidate,
    the novelty threshold on the train split's leave-donor-out values (:mod:`scmm.eval.calibration`); without
    such val cells, the model's contrastive temperature and no abstention (unless ``unknown_threshold``), novelty
    check or back-off. ``novelty``: the novelty check's reference and calibration set
    (:func:`scmm.eval.novelty.calibrated_novelty`), or None for no novelty check. Returns the calibration and
    the val figures (``val_abstain_rate``: the share of those val cells abstaining, each against the confidence
    cut chosen on the other val cells and the novelty cut, which never saw them; ``val_abstain_rate_novelty``: by
    the novelty check alone)."""
    fallback = Calibration(temperature=1.0 / _logit_scale(model),
                           threshold=unknown_threshold if unknown_threshold is not None else 0.0)
    if corpus.manifest["splits"].get("val", 0) <= 0:
        notes.append("the corpus has no val split: confidence at the model's contrastive temperature, no "
                     "abstention threshold, novelty check or back-off were chosen")
        return fallback, {}
    val_emb, val_true = _embed(model, corpus, "val", progress)
    index = {k: i for i, k in enumerate(cands.keys)}
    label = np.array([index.get(t, -1) for t in val_true], dtype=np.int64)
    ok = label >= 0
    if not ok.any():
        notes.append("no val cell has a candidate type: confidence at the model's contrastive temperature, no "
                     "abstention threshold, novelty check or back-off were chosen")
        return fallback, {}
    vsim = val_emb.embeddings[ok] @ protos.T
    temperature = fit_temperature(vsim, label[ok])
    vprob = softmax(vsim, temperature)
    vconf = vprob.max(1)
    conf_rate, nov_rate = split_rate(unknown_rate, novelty_share if novelty is not None else None)
    if unknown_threshold is not None:
        threshold, rate = float(unknown_threshold), None
    else:
        threshold, rate = abstention_threshold(vconf, conf_rate), float(unknown_rate)
    margin = choose_margin(vprob, cands.cl_ids, val_true[ok], ontology)
    cal = Calibration(temperature=temperature, threshold=threshold, unknown_rate=rate, margin=margin,
                      quantiles=confidence_quantiles(vconf), n_val_cells=int(ok.sum()))
    # each val cell against the confidence cut chosen on the other val cells (the cut on all of them would count
    # at most j - 1 of them by construction)
    abstain = vconf < threshold if unknown_threshold is not None else below_cut_left_out(vconf, conf_rate)
    figures: dict[str, Any] = {}
    if novelty is not None:
        reference, calib = novelty
        cal.novelty_quantiles, cal.novelty_share = confidence_quantiles(calib.values), float(novelty_share)
        cal.novelty_threshold = None if unknown_threshold is not None else novelty_threshold(calib.values, nov_rate)
        cal.novelty_reference, cal.novelty_calibration = reference.describe(), calib.describe()
        if cal.novelty_threshold is not None:
            novel = _aligned_similarity(reference, corpus, "val", val_emb.cell_ids)[ok] < cal.novelty_threshold
            abstain = abstain | novel
            figures["val_abstain_rate_novelty"] = float(np.mean(novel))
    figures["val_abstain_rate"] = float(np.mean(abstain))
    return cal, figures


def _foreign(model, corpus: Corpus, protos: np.ndarray, cands: Candidates, ontology, calibration: Calibration,
             reference: ExpressionNovelty | None, seed: int) -> dict:
    """``annotation.foreign``: cells made unlike the corpus (:func:`scmm.eval.foreign.foreign_counts`) annotated as
    ``scmm annotate`` would (embedding, calibrated confidence, novelty check)."""
    counts = foreign_counts(corpus, seed=seed)
    genes = np.arange(corpus.n_genes)
    x = log1p_normalize(counts, "counts", CP10K)
    emb = embed_profiles(model, x.toarray(), genes, corpus.gene_vocab_ids, seed=seed)
    similarity = None
    if reference is not None:
        similarity = reference.similarity(reference.profiles(counts, corpus.gene_vocab_ids))
    answers = calibrated_answers(emb @ protos.T, cands.keys, cands.names, cands.cl_ids, calibration, ontology,
                                 novelty=similarity)
    out: dict[str, Any] = {"n_cells": int(counts.shape[0]), "unknown_rate": float(np.mean(answers.unknown))}
    if answers.novel is not None:
        out["novel_rate"] = float(np.mean(answers.novel))
    return out


def _aligned_similarity(novelty: ExpressionNovelty, corpus: Corpus, split: str, cell_ids: list[str]) -> np.ndarray:
    """The novelty similarity of a split's cells, in the order of ``cell_ids`` (the embedded cells')."""
    sim, ids = split_similarity(novelty, corpus, split)
    if ids != list(cell_ids):
        raise ScmmError(f"cannot align the novelty check's cells of split '{split}' with the embedded cells")
    return sim


def _trust(y_true: np.ndarray, seen: np.ndarray, top_keys: np.ndarray, answers, backed, ontology,
           classes: list[str], calibration: Calibration, novelty: np.ndarray | None = None) -> dict:
    """The calibration, abstention and back-off figures on the test split (:func:`_annotate` says over which
    cells)."""
    t, conf = y_true[seen], answers.confidence[seen]
    out: dict[str, Any] = {
        "novelty_threshold": calibration.novelty_threshold,
        "temperature": calibration.temperature, "threshold": calibration.threshold,
        "unknown_rate": calibration.unknown_rate, "margin": calibration.margin,
        "ece": expected_calibration_error(conf, top_keys[seen] == t),
        **dict(zip(("ece_floor", "ece_floor_p10", "ece_floor_p90"), calibrated_ece(conf))),
        "abstain_rate": float(np.mean(answers.unknown[seen])),
        "lineage_accuracy": lineage_accuracy(t, top_keys[seen], ontology),
        "lineage_accuracy_backoff": lineage_accuracy(t, backed.keys[seen], ontology),
        "accuracy_backoff": float(np.mean(backed.keys[seen] == t)),
        "ontology_score_backoff": mean_pair_score(t, backed.keys[seen], ontology, "path"),
        "backoff_rate": float(np.mean(backed.keys[seen] != top_keys[seen])),
        "backoff_mean_level": float(np.mean(backed.level[seen])),
        "calibration": calibration.to_dict()}
    if answers.novel is not None:
        out["abstain_rate_novelty"] = float(np.mean(answers.novel[seen]))
    final = answers.keys[seen]
    u = annotation_metrics(t, final, ontology, labels=classes)
    kept = ~answers.unknown[seen]
    out["with_unknown"] = {
        "threshold": calibration.threshold, "accuracy": u["accuracy"], "macro_f1": u["macro_f1"],
        "ontology_score": u["ontology_score"], "unknown_rate": u["unknown_rate"],
        "lineage_accuracy": lineage_accuracy(t, final, ontology),
        "kept_accuracy": float(np.mean(final[kept] == t[kept])) if kept.any() else 0.0,
        "kept_lineage_accuracy": lineage_accuracy(t[kept], final[kept], ontology) if kept.any() else 0.0,
        "n_val_cells": calibration.n_val_cells}
    if (~seen).any():
        ut, ua = y_true[~seen], answers.keys[~seen]
        is_unknown = ua == UNKNOWN
        ancestor = np.array([is_same_or_ancestor(str(a), str(b), ontology) for a, b in zip(ua, ut)], dtype=bool)
        out["unseen"] = {"n_cells": int((~seen).sum()),
                         "unknown_or_ancestor_rate": float(np.mean(is_unknown | ancestor)),
                         "unknown_rate": float(np.mean(is_unknown)), "ancestor_rate": float(np.mean(ancestor)),
                         "types": sorted(set(ut.tolist()))}
        if answers.novel is not None:
            out["unseen"]["novel_rate"] = float(np.mean(answers.novel[~seen]))
        score = abstention_score(answers.confidence, novelty, calibration)
        out["unseen"]["auroc"] = binary_auroc(score[seen], score[~seen])
        out["unseen"]["auroc_confidence"] = binary_auroc(answers.confidence[seen], answers.confidence[~seen])
        if novelty is not None:
            out["unseen"]["auroc_novelty"] = binary_auroc(novelty[seen], novelty[~seen])
    return out


def _baselines(corpus: Corpus, y_true: np.ndarray, pred: np.ndarray, classes: list[str], ontology,
               seed: int, seen: np.ndarray, genes: np.ndarray) -> tuple[dict, dict]:
    """The baselines (train -> test, on the HVG panel ``genes``) and scmm + kNN smoothing, scored on the ``seen``
    test cells: (metrics section, details)."""
    try:
        base = run_corpus_baselines(corpus, seed=seed, genes=genes)
    except ValueError as exc:
        raise ScmmError(f"baselines: {exc}") from None
    if list(base["y_true"]) != list(y_true):
        raise ScmmError("baselines: the test cells of the expression matrix do not match the embedded cells")
    preds = dict(base["predictions"])
    k_smooth = smoothing_k(len(pred))
    preds["scmm_knn_smoothing"] = knn_smoothing(pred, base["z_test"], k=k_smooth, fit_pca=False, seed=seed)
    baselines, details = {}, {}
    for name in BASELINE_NAMES:
        m = annotation_metrics(y_true[seen], np.asarray(preds[name], dtype=object)[seen], ontology, labels=classes)
        baselines[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        details[name] = {"ontology_score": m["ontology_score"], "ppr_score": m["ppr_score"]}
    return baselines, {"baselines": details, "n_hvg": int(len(base["genes"])), "smoothing_k": int(k_smooth),
                       "baseline_train_cells": int(base["n_train_used"])}


def _annotate(model, corpus: Corpus, cands: Candidates, ontology, seed: int, tmp: Path, progress: bool,
              test, unknown_rate: float = DEFAULT_UNKNOWN_RATE,
              unknown_threshold: float | None = None, novelty_share: float = NOVELTY_SHARE) -> tuple[dict, dict]:
    """Zero-shot annotation of the test split.

    Which cells each figure is over: *seen-type* test cells (those whose type is not one of the corpus's
    held-out types, :attr:`Corpus.holdout_types`) for ``accuracy``, ``macro_f1``, ``ontology_score``,
    ``ppr_score``, ``n_cells`` (their count), ``ece``, ``abstain_rate``, ``lineage_accuracy`` (top-1 answer,
    no abstention, no back-off), ``lineage_accuracy_backoff``, ``accuracy_backoff``, ``ontology_score_backoff``,
    ``backoff_rate`` (answers after back-off, no abstention), ``with_unknown`` (final answers: abstention, then
    back-off) and the baselines; *held-out-type* test cells for ``unseen`` (final answers; ``auroc``: of the
    abstention score, ``auroc_confidence`` / ``auroc_novelty``: of the calibrated confidence / novelty
    similarity, seen-type test cells as positives). ``n_test_cells`` counts both.
    """
    emb, y_true = test
    protos = label_prototypes(model, cands)
    keys = np.asarray(cands.keys, dtype=object)
    sim = emb.embeddings @ protos.T
    best = sim.argmax(1)
    pred = keys[best]
    seen = ~np.isin(y_true.astype(str), corpus.holdout_types)
    classes = list(dict.fromkeys(cands.keys))
    details: dict[str, Any] = {"notes": []}
    if not seen.any():
        raise ScmmError("every test cell is of a held-out type: no seen-type cell to score the annotation on")
    ann = annotation_metrics(y_true[seen], pred[seen], ontology, labels=classes)
    details["per_class"] = ann.pop("per_class")
    metrics: dict[str, Any] = dict(ann)
    metrics["n_test_cells"] = int(len(y_true))
    metrics["ece_uncalibrated"] = expected_calibration_error(
        softmax(sim[seen], 1.0 / _logit_scale(model)).max(1), pred[seen] == y_true[seen])
    genes = hvg_panel(corpus, NOVELTY_GENES, "train")  # one pass over train: the novelty check's and baselines'
    fitted = calibrated_novelty(corpus, seed, genes=genes)
    reference = None if fitted is None else fitted[0]
    calibration, val_figures = _calibrate(model, corpus, protos, cands, ontology, progress, unknown_rate,
                                          unknown_threshold, details["notes"], fitted, novelty_share)
    novelty = None
    if calibration.has_novelty:
        novelty = _aligned_similarity(reference, corpus, "test", emb.cell_ids)
        reference.save(tmp / NOVELTY_FILE)
    answers = calibrated_answers(sim, cands.keys, cands.names, cands.cl_ids, calibration, ontology,
                                 novelty=novelty)
    no_abstain = Calibration(temperature=calibration.temperature, margin=calibration.margin)
    backed = calibrated_answers(sim, cands.keys, cands.names, cands.cl_ids, no_abstain, ontology, prob=answers.prob)
    metrics.update(_trust(y_true, seen, pred, answers, backed, ontology, classes, calibration, novelty))
    metrics.update(val_figures)
    metrics["foreign"] = _foreign(model, corpus, protos, cands, ontology, calibration,
                                  reference if calibration.has_novelty else None, seed)
    baselines, base_details = _baselines(corpus, y_true, pred, classes, ontology, seed, seen, genes)
    details.update(base_details)

    # plots (every test cell; held-out types get rows of their own)
    per_class = details["per_class"]
    rows = [r["label"] for r in per_class] + [t for t in corpus.holdout_types if t in set(y_true.tolist())]
    names = {r["label"]: r["name"] for r in per_class}
    for k, n in zip(cands.keys, cands.names):
        names.setdefault(k, n)
    for t in rows:
        names.setdefault(t, ontology.label(t) if ontology.is_valid(t) else t)
    confusion_matrix_png(y_true, pred, rows, [names[r] for r in rows], tmp / "confusion_matrix.png",
                         title="scmm, test split (rows: true type, normalised)")
    details["pngs"] = ["confusion_matrix.png"]
    if seen.any():
        reliability_png(answers.confidence[seen], pred[seen] == y_true[seen], tmp / "reliability.png",
                        title="Calibrated confidence, seen-type test cells")
        details["pngs"].append("reliability.png")
    panels = {"true type": [names.get(t, t) for t in y_true], "predicted type": [names.get(p, p) for p in pred]}
    if umap_png(emb.embeddings, panels, tmp / "umap.png", seed, "scmm cell embeddings (test split)",
                details["notes"]):
        details["pngs"].append("umap.png")
    details["candidates"] = [{"key": k, "name": n} for k, n in zip(cands.keys, cands.names)]
    details["holdout_types"] = {t: names.get(t, t) for t in corpus.holdout_types}
    return {"annotation": metrics, "baselines": baselines}, details


def _retrieve(model, test) -> dict:
    emb, y_true = test
    text_emb = _text_features(model, emb.texts)
    return retrieval_metrics(emb.embeddings, text_emb, cell_labels=y_true)


def _generate(model: ScmmModel, corpus: Corpus, seed: int, reference_splits: Sequence[str] = REFERENCE_SPLITS
              ) -> dict:
    """Pseudo-cells from every type's training texts, scored by k-NN in expression-PCA and stage-1 space."""
    try:
        return pseudocell_evaluation(model.stage2, corpus, seed=seed, n_per_type=PSEUDOCELLS_PER_TYPE,
                                     k=PSEUDOCELL_K, reference_splits=reference_splits)
    except ValueError as exc:
        raise ScmmError(f"pseudo-cell evaluation: {exc}") from None


def _language(model: ScmmModel, corpus: Corpus, test, described: dict, generate: bool, seed: int) -> dict:
    """``language.*`` (:mod:`scmm.eval.language`): search always, claims after describe, text-to-cell after
    generate; ``{"absent": ...}`` for a corpus without per-cell facts."""
    emb = test[0]
    descriptions = dict(zip(described["cell_id"], described["descriptions"])) \
        if described.get("descriptions") else None
    return language_report(corpus, embeddings=emb.embeddings, embedded_ids=emb.cell_ids,
                           text_features=lambda texts: _text_features(model.aligner, texts),
                           descriptions=descriptions, stage2=model.stage2 if generate else None,
                           answers_model=model.stage2 if descriptions is not None else None, seed=seed)


def _run_tasks(model: ScmmModel, corpus: Corpus, tasks: Sequence[str], cands: Candidates, ontology, seed: int,
               tmp: Path, progress: bool, unknown_rate: float = DEFAULT_UNKNOWN_RATE,
               unknown_threshold: float | None = None, novelty_share: float = NOVELTY_SHARE,
               split: str = "test") -> tuple[dict, dict]:
    """Every task's metrics section, and what the report shows besides."""
    if split == "val":
        return _run_stage2_on_val(model, corpus, tasks, ontology, seed, progress)
    aligner = model.aligner
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {"notes": []}
    with torch.no_grad():
        test = _embed(aligner, corpus, "test", progress)
        if "annotate" in tasks:
            m, d = _annotate(aligner, corpus, cands, ontology, seed, tmp, progress, test, unknown_rate,
                             unknown_threshold, novelty_share)
            metrics.update(m)
            details["notes"] += d.pop("notes")
            details["annotation"] = d
        if "retrieve" in tasks:
            metrics["retrieval"] = _retrieve(aligner, test)
        described: dict[str, list] = {}
        if "describe" in tasks:
            metrics["generation"], details["generation_examples"] = generation_report(
                model.stage2, corpus, "test", ontology, progress=progress, n_examples=EXAMPLES, collect=described)
        if "generate" in tasks:
            metrics["pseudocell"] = _generate(model, corpus, seed)
            details["notes"] += metrics["pseudocell"].pop("notes", [])
        metrics["language"] = _language(model, corpus, test, described, "generate" in tasks, seed)
        if described.get("descriptions"):
            details["language_examples"] = type_examples(
                corpus, dict(zip(described["cell_id"], described["descriptions"])))
    return _json_safe(metrics), details


def _run_stage2_on_val(model: ScmmModel, corpus: Corpus, tasks: Sequence[str], ontology, seed: int,
                       progress: bool) -> tuple[dict, dict]:
    """The stage-2 tasks scored on val, for choosing stage-2 settings without touching the test split: the
    descriptions and answers of val cells, and pseudo-cells scored against val cells only."""
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {"notes": ["scored on the val split (--split val): for choosing settings; the test "
                                         "split is untouched"]}
    with torch.no_grad():
        if "describe" in tasks:
            metrics["generation"], details["generation_examples"] = generation_report(
                model.stage2, corpus, "val", ontology, progress=progress, n_examples=EXAMPLES)
        if "generate" in tasks:
            metrics["pseudocell"] = _generate(model, corpus, seed, reference_splits=("val",))
            details["notes"] += metrics["pseudocell"].pop("notes", [])
    return _json_safe(metrics), details


# --- output -----------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if not math.isfinite(v):
            raise ValueError(f"non-finite metric value {v}")
        return v
    return obj


def _open(model_dir: Path, corpus_dir: Path, out_dir: Path, tasks, labels) -> tuple:
    """Check every input before any work: (model, corpus, tasks, candidates, label list)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ScmmError(f"output {out_dir} exists and is not a folder")
    if not model_dir.exists():
        raise ScmmError(f"model folder not found: {model_dir}")
    corpus = Corpus(corpus_dir)
    splits = dict(corpus.manifest["splits"])
    if splits.get("test", 0) <= 0:
        raise ScmmError(f"corpus {corpus_dir} has an empty test split: nothing to evaluate")
    label_list = read_labels_option(labels)
    tasks = parse_tasks(tasks) if tasks is not None else None
    if tasks is not None and label_list is not None and "annotate" not in tasks:
        raise ScmmError("labels are candidate labels for the annotate task, which is not among the tasks")
    ontology = get_ontology()
    cands = Candidates.from_user(label_list, ontology) if label_list is not None else Candidates.from_corpus(corpus)
    model = load_model(model_dir)  # any kind of model folder; a package's checksums are verified
    tasks = tasks if tasks is not None else default_tasks(model)
    wanted = [t for t in tasks if t in STAGE2_TASKS]
    if wanted and not model.has_stage2:
        raise ScmmError(f"task(s) {', '.join(wanted)} need a stage-2 model (LLM bridge); {model_dir} has no "
                        f"stage-2 parts (use --tasks {','.join(STAGE1_TASKS)})")
    if "annotate" in tasks and splits.get("train", 0) < 2:
        raise ScmmError(f"corpus {corpus_dir} has {splits.get('train', 0)} train cells: the baselines need at least 2")
    model.vocab.check_panel(corpus.gene_symbols, corpus.gene_vocab_ids, f"the corpus {corpus_dir}")
    return model, corpus, tasks, cands, label_list


def evaluate(model_dir: str | Path, corpus_dir: str | Path, out_dir: str | Path,
             tasks: str | Sequence[str] | None = None, seed: int = 0, progress: bool = True,
             labels: str | Sequence[str] | None = None, unknown_rate: float | None = None,
             unknown_threshold: float | None = None, novelty_share: float | None = None,
             split: str = "test") -> dict:
    """Run the tasks and write ``metrics.json``, ``report.md`` and PNGs into ``out_dir``; returns the metrics.

    ``split``: ``"test"`` (the evaluation), or ``"val"`` to score the stage-2 tasks (describe, generate) on val
    when choosing stage-2 settings, so that the test split stays unseen (annotation and retrieval need val for
    their calibration, so they run on test only).

    ``tasks``: default every task the model can do (:func:`default_tasks`).
    ``labels``: candidate labels for annotation (a list, a comma-separated string or a file; see
    :func:`scmm.eval.annotate.read_labels_option`); default the corpus's cell types.
    ``unknown_rate`` (default 0.05): the share of val cells allowed to abstain, which sets the abstention
    threshold; ``unknown_threshold`` sets it directly (a calibrated confidence in [0, 1]); not both.
    ``novelty_share`` (default 0.5): the share of that rate given to the novelty check (the rest to the
    confidence; :mod:`scmm.eval.calibration`).
    """
    check_unknown_options(unknown_rate, unknown_threshold)
    if split not in ("test", "val"):
        raise ScmmError(f"--split must be test or val, not '{split}'")
    share = NOVELTY_SHARE if novelty_share is None else float(novelty_share)
    if not 0.0 <= share <= 1.0:  # NaN fails too
        raise ScmmError(f"--novelty-share must be in [0, 1], got {novelty_share}")
    rate = DEFAULT_UNKNOWN_RATE if unknown_rate is None else float(unknown_rate)
    t0 = time.perf_counter()
    model_dir, corpus_dir, out_dir = Path(model_dir), Path(corpus_dir), Path(out_dir)
    model, corpus, tasks, cands, label_list = _open(model_dir, corpus_dir, out_dir, tasks, labels)
    if split == "val" and set(tasks) - set(STAGE2_TASKS):
        raise ScmmError(f"--split val scores only the stage-2 tasks (describe, generate), not "
                        f"{', '.join(sorted(set(tasks) - set(STAGE2_TASKS)))}: annotation calibrates on val; pass "
                        "--tasks describe,generate")
    torch.manual_seed(seed)
    log.info("evaluating %s on %s: tasks %s", model_dir, corpus_dir, ", ".join(tasks))
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        metrics, details = _run_tasks(model, corpus, tasks, cands, get_ontology(), seed, tmp, progress, rate,
                                      unknown_threshold, share, split)
        context = {
            "model": str(model_dir), "corpus": str(corpus_dir), "out": str(out_dir), "tasks": list(tasks),
            "split": split,
            "seed": seed, "splits": dict(corpus.manifest["splits"]), "split_seed": corpus.manifest.get("split_seed"),
            "split_group_by": corpus.manifest.get("split_group_by"), "n_cell_types": len(corpus.cell_types),
            "encoding": asdict(model.encoding), "labels": "user list" if label_list is not None else
            "corpus cell types", **details, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        write_report(metrics, tmp, context)
        result.update(metrics)

    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    try:
        write_folder(out_dir, write, marker="metrics.json", merge=True, owned=OUTPUT_FILES)
    except BaseException:
        for p in created:  # leave no empty parent folders behind either
            try:
                p.rmdir()
            except OSError:
                break
        raise
    log.info("wrote %s (%.1f s)", out_dir, time.perf_counter() - t0)
    return result
