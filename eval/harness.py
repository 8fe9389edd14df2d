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
  *Unknown option*: the similarity threshold below which a cell is called ``unknown`` is chosen on the
  **val** split (:func:`scmm.eval.metrics.choose_unknown_threshold`, criterion ``decision``) and applied to test:
  ``annotation.with_unknown`` (``threshold`` is a cosine similarity in [-1, 1]; -1 means "keep every cell").
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
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus, label_keys
from scmm.errors import ScmmError
from scmm.eval.annotate import Candidates, Embedded, embed_split, label_prototypes, predict_by_text, read_labels_option
from scmm.eval.baselines import knn_smoothing, run_corpus_baselines, smoothing_k
from scmm.eval.metrics import annotation_metrics, apply_unknown, choose_unknown_threshold, confusion_matrix_png
from scmm.eval.plots import umap_png
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
OUTPUT_FILES = ("metrics.json", "report.md", "confusion_matrix.png", "umap.png")


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
def _with_unknown(model, corpus: Corpus, protos: np.ndarray, keys: np.ndarray, test: tuple, pred: np.ndarray,
                  sim: np.ndarray, classes: list[str], ontology, progress: bool) -> dict:
    """The 'unknown' option: a similarity threshold chosen on val, applied to test."""
    _, y_true = test
    val_emb, val_true = _embed(model, corpus, "val", progress)
    vbest, vsim = predict_by_text(val_emb.embeddings, protos)
    threshold = choose_unknown_threshold(vsim, keys[vbest] == val_true)
    pred_u = apply_unknown(pred, sim, threshold)
    u = annotation_metrics(y_true, pred_u, ontology, labels=classes)
    kept = pred_u != "unknown"
    return {"threshold": float(max(threshold, -1.0)), "accuracy": u["accuracy"], "macro_f1": u["macro_f1"],
            "ontology_score": u["ontology_score"], "unknown_rate": u["unknown_rate"],
            "kept_accuracy": float(np.mean(pred_u[kept] == y_true[kept])) if kept.any() else 0.0,
            "n_val_cells": int(len(val_true))}


def _baselines(corpus: Corpus, y_true: np.ndarray, pred: np.ndarray, classes: list[str], ontology,
               seed: int) -> tuple[dict, dict]:
    """The baselines (train -> test) and scmm + kNN smoothing: (metrics section, details)."""
    try:
        base = run_corpus_baselines(corpus, seed=seed)
    except ValueError as exc:
        raise ScmmError(f"baselines: {exc}") from None
    if list(base["y_true"]) != list(y_true):
        raise ScmmError("baselines: the test cells of the expression matrix do not match the embedded cells")
    preds = dict(base["predictions"])
    k_smooth = smoothing_k(len(pred))
    preds["scmm_knn_smoothing"] = knn_smoothing(pred, base["z_test"], k=k_smooth, fit_pca=False, seed=seed)
    baselines, details = {}, {}
    for name in BASELINE_NAMES:
        m = annotation_metrics(y_true, preds[name], ontology, labels=classes)
        baselines[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        details[name] = {"ontology_score": m["ontology_score"], "ppr_score": m["ppr_score"]}
    return baselines, {"baselines": details, "n_hvg": int(len(base["genes"])), "smoothing_k": int(k_smooth),
                       "baseline_train_cells": int(base["n_train_used"])}


def _annotate(model, corpus: Corpus, cands: Candidates, ontology, seed: int, tmp: Path, progress: bool,
              test) -> tuple[dict, dict]:
    emb, y_true = test
    protos = label_prototypes(model, cands)
    keys = np.asarray(cands.keys, dtype=object)
    best, sim = predict_by_text(emb.embeddings, protos)
    pred = keys[best]
    classes = list(dict.fromkeys(cands.keys))
    ann = annotation_metrics(y_true, pred, ontology, labels=classes)
    per_class = ann.pop("per_class")
    metrics: dict[str, Any] = dict(ann)
    details: dict[str, Any] = {"per_class": per_class, "notes": []}
    if corpus.manifest["splits"].get("val", 0) > 0:
        metrics["with_unknown"] = _with_unknown(model, corpus, protos, keys, test, pred, sim, classes, ontology,
                                                progress)
    else:
        details["notes"].append("the corpus has no val split: no 'unknown' threshold was chosen")
    baselines, base_details = _baselines(corpus, y_true, pred, classes, ontology, seed)
    details.update(base_details)

    # plots
    row_names = [r["name"] for r in per_class]
    names = {r["label"]: r["name"] for r in per_class}
    for k, n in zip(cands.keys, cands.names):
        names.setdefault(k, n)
    confusion_matrix_png(y_true, pred, [r["label"] for r in per_class], row_names, tmp / "confusion_matrix.png",
                         title="scmm, test split (rows: true type, normalised)")
    details["pngs"] = ["confusion_matrix.png"]
    panels = {"true type": [names.get(t, t) for t in y_true], "predicted type": [names.get(p, p) for p in pred]}
    if umap_png(emb.embeddings, panels, tmp / "umap.png", seed, "scmm cell embeddings (test split)",
                details["notes"]):
        details["pngs"].append("umap.png")
    details["candidates"] = [{"key": k, "name": n} for k, n in zip(cands.keys, cands.names)]
    return {"annotation": metrics, "baselines": baselines}, details


def _retrieve(model, test) -> dict:
    emb, y_true = test
    text_emb = _text_features(model, emb.texts)
    return retrieval_metrics(emb.embeddings, text_emb, cell_labels=y_true)


def _generate(model: ScmmModel, corpus: Corpus, seed: int) -> dict:
    """Pseudo-cells from every type's training texts, scored by k-NN in expression-PCA and stage-1 space."""
    try:
        return pseudocell_evaluation(model.stage2, corpus, seed=seed, n_per_type=PSEUDOCELLS_PER_TYPE,
                                     k=PSEUDOCELL_K)
    except ValueError as exc:
        raise ScmmError(f"pseudo-cell evaluation: {exc}") from None


def _run_tasks(model: ScmmModel, corpus: Corpus, tasks: Sequence[str], cands: Candidates, ontology, seed: int,
               tmp: Path, progress: bool) -> tuple[dict, dict]:
    """Every task's metrics section, and what the report shows besides."""
    aligner = model.aligner
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {"notes": []}
    with torch.no_grad():
        test = _embed(aligner, corpus, "test", progress)
        if "annotate" in tasks:
            m, d = _annotate(aligner, corpus, cands, ontology, seed, tmp, progress, test)
            metrics.update(m)
            details["notes"] += d.pop("notes")
            details["annotation"] = d
        if "retrieve" in tasks:
            metrics["retrieval"] = _retrieve(aligner, test)
        if "describe" in tasks:
            metrics["generation"], details["generation_examples"] = generation_report(
                model.stage2, corpus, "test", ontology, progress=progress, n_examples=EXAMPLES)
        if "generate" in tasks:
            metrics["pseudocell"] = _generate(model, corpus, seed)
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
             labels: str | Sequence[str] | None = None) -> dict:
    """Run the tasks and write ``metrics.json``, ``report.md`` and PNGs into ``out_dir``; returns the metrics.

    ``tasks``: default every task the model can do (:func:`default_tasks`).
    ``labels``: candidate labels for annotation (a list, a comma-separated string or a file; see
    :func:`scmm.eval.annotate.read_labels_option`); default the corpus's cell types.
    """
    t0 = time.perf_counter()
    model_dir, corpus_dir, out_dir = Path(model_dir), Path(corpus_dir), Path(out_dir)
    model, corpus, tasks, cands, label_list = _open(model_dir, corpus_dir, out_dir, tasks, labels)
    torch.manual_seed(seed)
    log.info("evaluating %s on %s: tasks %s", model_dir, corpus_dir, ", ".join(tasks))
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        metrics, details = _run_tasks(model, corpus, tasks, cands, get_ontology(), seed, tmp, progress)
        context = {
            "model": str(model_dir), "corpus": str(corpus_dir), "out": str(out_dir), "tasks": list(tasks),
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
