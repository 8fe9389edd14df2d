"""One evaluation run: a stage-1 model on a corpus's fixed splits -> ``metrics.json``, ``report.md``, PNGs.

    scmm eval --model DIR --corpus DIR --out DIR [--tasks annotate,retrieve] [--labels LIST|FILE]

Tasks (``TASKS``):

* **annotate**: zero-shot annotation by text on the **test** split. Candidate labels are the corpus's cell
  types (CL IDs; kept free-text labels ``unmatched:<label>`` use their label as text) or a user list
  (``labels=``): CL IDs, or free text, which is matched to a CL term by label/synonym when possible (the
  prediction is then that CL ID, and its text is the user's wording plus the CL definition) and otherwise
  predicted as the text itself (it then never matches a corpus label). Each candidate's prototype is the mean
  embedding of its phrasings (:func:`eval.annotate.label_prototypes`); a cell gets the most similar prototype.
  Scores: :func:`eval.metrics.annotation_metrics` (the per-class table goes to the report only).
  *Unknown option*: the similarity threshold below which a cell is called ``unknown`` is chosen on the
  **val** split (:func:`eval.metrics.choose_unknown_threshold`, criterion ``decision``) and applied to test:
  ``annotation.with_unknown`` (``threshold`` is a cosine similarity in [-1, 1]; -1 means "keep every cell").
  Plots: ``confusion_matrix.png`` and ``umap.png`` (test cell embeddings coloured by true and by predicted
  type; at most ``eval.plots.UMAP_MAX_CELLS`` cells, a seeded subsample beyond).
  **Baselines** run with annotate, fitted on train and scored on test (:mod:`eval.baselines`): ``majority``,
  ``logistic_regression``, ``pca_knn``, and ``scmm_knn_smoothing`` (scmm's test predictions smoothed over the
  k-NN graph of the test cells in expression space, with ``k`` from :func:`eval.baselines.smoothing_k`):
  ``baselines.<name> = {accuracy, macro_f1}``. The baselines are fitted on at most
  ``eval.baselines.BASELINE_MAX_TRAIN_CELLS`` train cells (a seeded subsample beyond).
* **retrieve**: :func:`eval.retrieval.retrieval_metrics` between the test cells' embeddings and the text
  features of their own texts (recall@1/5/10 both ways, mean ranks, label-level recall).
* **describe**, **generate**: stage-2 tasks; a stage-1 model folder has no stage-2 parts, so asking for them
  is an error.

Loader settings (value encoding) come from :func:`loader_config_for`. Splits come from the corpus manifest,
the seed of the baselines and the UMAP from ``seed``; the model runs in fp32 on CPU in eval mode, so the same
model and corpus give the same ``metrics.json``.

Output is atomic: everything is written into a temporary folder beside ``out_dir`` and moved into place at
the end (a new folder in one rename; into an existing folder the files are replaced one by one, ``metrics.json``
last, and earlier outputs of this harness that the run did not produce again are removed). Bad input (missing
model or corpus, unknown task, stage-2 task, bad label) is a :class:`~scmm.errors.ScmmError` raised before
anything is written.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scmm.data_pipeline.loader import LoaderConfig
from scmm.data_pipeline.store import Corpus, label_keys
from scmm.eval.plots import umap_png
from scmm.atomic import temp_dir_beside
from scmm.errors import ScmmError

log = logging.getLogger("scmm.eval")

TASKS = ("annotate", "retrieve", "describe", "generate")
STAGE1_TASKS = ("annotate", "retrieve")
STAGE2_TASKS = ("describe", "generate")
DEFAULT_TASKS = ("annotate", "retrieve")
PSEUDOCELLS_PER_TYPE = 20  # generated per cell type (the issue asks for at least 20)
PSEUDOCELL_K = 5
EXAMPLES = 8  # generated descriptions shown in report.md
TEXT_BATCH = 64  # texts per text-tower call: bounds the activation memory (~100 MB at 128 tokens)
UNMATCHED_PREFIX = "unmatched:"
# every file this harness may write (stale ones are removed when a later run into the same folder skips them)
OUTPUT_FILES = ("metrics.json", "report.md", "confusion_matrix.png", "umap.png")
BASELINE_NAMES = ("majority", "logistic_regression", "pca_knn", "scmm_knn_smoothing")


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


def read_labels_option(value: str | Sequence[str] | None) -> list[str] | None:
    """Candidate labels from ``--labels``: a file (one label per line; blank lines and ``#`` comments skipped)
    when ``value`` names an existing file, else a comma-separated list. A sequence is taken as is."""
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        if path.is_file():
            items = [line.strip() for line in path.read_text().splitlines()]
            items = [x for x in items if x and not x.startswith("#")]
            where = f"labels file {path}"
        else:
            items = [x.strip() for x in value.split(",") if x.strip()]
            where = "--labels"
    else:
        items = [str(x).strip() for x in value if str(x).strip()]
        where = "labels"
    items = list(dict.fromkeys(items))
    if not items:
        raise ScmmError(f"{where} holds no label")
    return items


def _find_loader_config(model_dir: Path) -> tuple[LoaderConfig, str]:
    from scmm.config import from_dict
    candidates = [(model_dir / "loader.json", None), (model_dir.parent / "config.json", "loader")]
    for path, key in candidates:
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ScmmError(f"cannot read the loader settings in {path}: {exc}") from None
        if key is not None:
            if not isinstance(raw, dict) or not isinstance(raw.get(key), dict) or "model" not in raw:
                continue  # not a stage-1 run config
            raw = raw[key]
        try:
            return from_dict(LoaderConfig, raw), str(path)
        except ScmmError as exc:
            raise ScmmError(f"loader settings in {path}: {exc}") from None
    return LoaderConfig(n_bins=0), "defaults (no loader settings found beside the model)"


def loader_config_for(model_dir: str | Path) -> LoaderConfig:
    """The loader settings (value encoding) the model was trained with; the one place that decides them.

    In order: ``<model>/loader.json`` (a LoaderConfig as JSON), the ``loader`` key of the stage-1 run config
    ``<model>/../config.json`` (written by ``pretrain/train.py`` one level above its ``model/`` folder), else
    ``LoaderConfig(n_bins=0)`` (continuous log1p values). Evaluation then keeps every expressed gene and does
    not shuffle (:func:`eval.annotate.inference_loader_config`).
    """
    return _find_loader_config(Path(model_dir))[0]


@dataclass
class Candidates:
    """Candidate labels for annotation: the predicted key, a display name and the prototype text of each."""

    keys: list[str]          # what a prediction reads (CL ID, `unmatched:<label>`, or the user's free text)
    names: list[str]         # display names
    ids: list[str]           # the id given to label_texts (a CL ID, or the free text)
    texts: list[str | None]  # the label wording (None: the ontology label of the CL ID)


def resolve_candidates(labels: Sequence[str] | None, corpus: Corpus, ontology) -> Candidates:
    """Candidates from a user list (CL IDs / free text) or, by default, the corpus's cell types."""
    keys, names, ids, texts = [], [], [], []
    if labels is None:
        for key in corpus.cell_types:
            if key.startswith(UNMATCHED_PREFIX):
                text = key[len(UNMATCHED_PREFIX):]
                keys.append(key), names.append(text), ids.append(text), texts.append(text)
            else:
                keys.append(key), names.append(_name(key, ontology)), ids.append(key), texts.append(None)
        if not keys:
            raise ScmmError(f"corpus {corpus.path} lists no cell types")
        return Candidates(keys, names, ids, texts)
    for item in labels:
        if re.fullmatch(r"[A-Za-z]+[:_]\d+", item):  # looks like an ontology ID: must be a known CL term
            term = ontology.match_cell_type(item)
            if term is None:
                raise ScmmError(f"label {item!r} is not a known Cell Ontology (CL) term")
            keys.append(term), names.append(_name(term, ontology)), ids.append(term), texts.append(None)
            continue
        term = ontology.match_cell_type(item)
        if term is not None:  # free text naming a CL term: predict the CL ID, phrase it the user's way
            keys.append(term), names.append(item), ids.append(term), texts.append(item)
        else:
            keys.append(item), names.append(item), ids.append(item), texts.append(item)
    return Candidates(keys, names, ids, texts)


def _name(key: str, ontology) -> str:
    try:
        return ontology.label(key) if ontology.is_valid(key) else key
    except KeyError:
        return key


def _prototypes(model, cands: Candidates) -> np.ndarray:
    from scmm.eval.annotate import label_prototypes
    rows = []
    for cid, text in zip(cands.ids, cands.texts):
        rows.append(label_prototypes(model, [cid], free_text=None if text is None else {cid: text})[0])
    return np.stack(rows).astype(np.float32)


def _load_model(model_dir: Path):
    from scmm.model.aligner import CellTextAligner
    if not model_dir.exists():
        raise ScmmError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise ScmmError(f"model {model_dir} is not a folder")
    if not (model_dir / "config.json").is_file():
        raise ScmmError(f"{model_dir} is not an scmm model folder (no config.json)")
    model = CellTextAligner.from_pretrained(model_dir)
    return model.float().eval()


def _check_vocab(vocab: dict[str, int], corpus: Corpus) -> None:
    """The corpus's genes must have the same vocabulary ids in the model (else embeddings are meaningless)."""
    ids = corpus.gene_vocab_ids
    wrong = [str(s) for s, i in zip(corpus.gene_symbols, ids) if vocab.get(str(s)) != int(i)]
    if wrong:
        raise ScmmError(f"the corpus {corpus.path} was built against another gene vocabulary than the model's "
                        f"({len(wrong)} of {len(ids)} genes differ, e.g. {', '.join(wrong[:3])}); rebuild it "
                        f"with --vocab <model>/cell_tower/vocab.json")


@dataclass
class OpenedModel:
    """The parts of a model folder the harness uses: the stage-1 aligner, its loader settings, stage 2 if any."""

    aligner: Any
    loader_cfg: LoaderConfig
    loader_source: str
    stage2: Any = None  # finetune.model.Stage2Model


def _stage2_folder(model_dir: Path) -> Path | None:
    """The stage-2 part of a model folder: a packaged model's ``stage2/``, or the folder itself."""
    if (model_dir / "scmm_model.json").is_file():
        return model_dir / "stage2" if (model_dir / "stage2" / "config.json").is_file() else None
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    from scmm.model.stage2 import FORMAT as STAGE2_FORMAT
    return model_dir if isinstance(raw, dict) and raw.get("format") == STAGE2_FORMAT else None


def _open_model(model_dir: Path, tasks: Sequence[str]) -> OpenedModel:
    """A stage-1 model folder, a stage-2 model folder (with its `stage1/`) or a packaged model (`scmm package`)."""
    stage2_dir = _stage2_folder(model_dir)
    wanted = [t for t in tasks if t in STAGE2_TASKS]
    if wanted and stage2_dir is None:
        raise ScmmError(f"task(s) {', '.join(wanted)} need a stage-2 model (LLM bridge); {model_dir} has no "
                        f"stage-2 parts (use --tasks {','.join(STAGE1_TASKS)})")
    if (model_dir / "scmm_model.json").is_file():
        from scmm.model.folders import load_model
        packaged = load_model(model_dir)  # checks the format version and every file's checksum
        stage1_dir, aligner = model_dir / "stage1", packaged.aligner
    elif stage2_dir is not None:
        stage1_dir, aligner = stage2_dir / "stage1", None
    else:
        stage1_dir, aligner = model_dir, None
    stage2 = None
    if wanted:
        from scmm.model.stage2 import Stage2Model
        stage2 = Stage2Model.from_pretrained(stage2_dir)
        aligner = stage2.aligner  # the same stage-1 weights, loaded once
    if aligner is None:
        aligner = _load_model(stage1_dir)
    loader_cfg, source = _find_loader_config(stage1_dir)
    return OpenedModel(aligner.float().eval(), loader_cfg, source, stage2)


def default_tasks(model_dir: str | Path) -> tuple[str, ...]:
    """Every task the model can do: annotate and retrieve, plus describe and generate with a stage-2 part."""
    return TASKS if _stage2_folder(Path(model_dir)) is not None else DEFAULT_TASKS


# --- data -------------------------------------------------------------------------------------------
def _split_cells(corpus: Corpus, split: str) -> tuple[list[str], list[str]]:
    """(cell IDs, label keys) of a split in shard order (the order of the baselines' expression matrices)."""
    ids, labels = [], []
    for shard in corpus.iter_shards(split, columns=("cell_id", "cell_type_ontology_term_id", "cell_type")):
        ids += [str(c) for c in shard.obs["cell_id"]]
        labels += label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"])
    return ids, labels


def _embed(model, corpus: Corpus, split: str, loader_cfg: LoaderConfig, progress: bool):
    """Embedded split re-ordered into shard order, with label keys; (embedded, label keys)."""
    from scmm.eval.annotate import Embedded, embed_split
    emb = embed_split(model, corpus, split, loader_cfg, progress)
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
    import torch
    uniq, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    parts = []
    with torch.no_grad():
        for start in range(0, len(uniq), TEXT_BATCH):
            f = model.text_features(uniq[start:start + TEXT_BATCH].tolist()).float()
            parts.append(torch.nn.functional.normalize(f, dim=-1).numpy())
    return np.concatenate(parts).astype(np.float32)[inverse]


# --- tasks ------------------------------------------------------------------------------------------
def _annotate(model, corpus: Corpus, cands: Candidates, loader_cfg: LoaderConfig, ontology, seed: int,
              tmp: Path, progress: bool, test) -> tuple[dict, dict]:
    from scmm.eval.annotate import predict_by_text
    from scmm.eval.metrics import annotation_metrics, apply_unknown, choose_unknown_threshold, confusion_matrix_png
    emb, y_true = test
    protos = _prototypes(model, cands)
    keys = np.asarray(cands.keys, dtype=object)
    best, sim = predict_by_text(emb.embeddings, protos)
    pred = keys[best]
    classes = list(dict.fromkeys(cands.keys))
    ann = annotation_metrics(y_true, pred, ontology, labels=classes)
    per_class = ann.pop("per_class")
    metrics: dict[str, Any] = dict(ann)
    details: dict[str, Any] = {"per_class": per_class, "notes": []}

    # the 'unknown' option: threshold on val, applied to test
    if corpus.manifest["splits"].get("val", 0) > 0:
        val_emb, val_true = _embed(model, corpus, "val", loader_cfg, progress)
        vbest, vsim = predict_by_text(val_emb.embeddings, protos)
        threshold = choose_unknown_threshold(vsim, keys[vbest] == val_true)
        pred_u = apply_unknown(pred, sim, threshold)
        u = annotation_metrics(y_true, pred_u, ontology, labels=classes)
        kept = pred_u != "unknown"
        metrics["with_unknown"] = {
            "threshold": float(max(threshold, -1.0)), "accuracy": u["accuracy"], "macro_f1": u["macro_f1"],
            "ontology_score": u["ontology_score"], "unknown_rate": u["unknown_rate"],
            "kept_accuracy": float(np.mean(pred_u[kept] == y_true[kept])) if kept.any() else 0.0,
            "n_val_cells": int(len(val_true))}
    else:
        details["notes"].append("the corpus has no val split: no 'unknown' threshold was chosen")

    # baselines (train -> test) and scmm + kNN smoothing
    from scmm.eval.baselines import knn_smoothing, run_corpus_baselines, smoothing_k
    try:
        base = run_corpus_baselines(corpus, seed=seed)
    except ValueError as exc:
        raise ScmmError(f"baselines: {exc}") from None
    if list(base["y_true"]) != list(y_true):
        raise ScmmError("baselines: the test cells of the expression matrix do not match the embedded cells")
    preds = dict(base["predictions"])
    k_smooth = smoothing_k(len(pred))
    preds["scmm_knn_smoothing"] = knn_smoothing(pred, base["z_test"], k=k_smooth, fit_pca=False, seed=seed)
    baselines, base_details = {}, {}
    for name in BASELINE_NAMES:
        m = annotation_metrics(y_true, preds[name], ontology, labels=classes)
        baselines[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        base_details[name] = {"ontology_score": m["ontology_score"], "ppr_score": m["ppr_score"]}
    details["baselines"] = base_details
    details["n_hvg"] = int(len(base["genes"]))
    details["smoothing_k"] = int(k_smooth)
    details["baseline_train_cells"] = int(base["n_train_used"])

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
    from scmm.eval.retrieval import retrieval_metrics
    emb, y_true = test
    text_emb = _text_features(model, emb.texts)
    return retrieval_metrics(emb.embeddings, text_emb, cell_labels=y_true)


# --- output -----------------------------------------------------------------------------------------
def _generate(opened: OpenedModel, corpus: Corpus, seed: int) -> dict:
    """Pseudo-cells from every type's training texts, scored by k-NN in expression-PCA and stage-1 space."""
    from scmm.eval.stage2 import pseudocell_evaluation
    try:
        return pseudocell_evaluation(opened.stage2, corpus, seed=seed, n_per_type=PSEUDOCELLS_PER_TYPE,
                                     k=PSEUDOCELL_K, loader_cfg=opened.loader_cfg)
    except ValueError as exc:
        raise ScmmError(f"pseudo-cell evaluation: {exc}") from None


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


def _publish(tmp: Path, out: Path, written: Sequence[str]) -> None:
    """Move the files of ``tmp`` into ``out`` (see the module docstring) and remove ``tmp``."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.is_dir():
                raise
    for path in sorted(tmp.iterdir(), key=lambda p: (p.name == "metrics.json", p.name)):
        os.replace(path, out / path.name)
    for name in OUTPUT_FILES:
        if name not in written and (out / name).is_file():
            (out / name).unlink()
    shutil.rmtree(tmp, ignore_errors=True)


def evaluate(model_dir: str | Path, corpus_dir: str | Path, out_dir: str | Path,
             tasks: str | Sequence[str] | None = None, seed: int = 0, progress: bool = True,
             labels: str | Sequence[str] | None = None) -> dict:
    """Run the tasks and write ``metrics.json``, ``report.md`` and PNGs into ``out_dir``; returns the metrics.

    ``tasks``: default every task the model can do (:func:`default_tasks`).
    ``labels``: candidate labels for annotation (a list, a comma-separated string or a file; see
    :func:`read_labels_option`); default the corpus's cell types.
    """
    import torch

    from scmm.data_pipeline.ontology import get_ontology
    from scmm.eval.report import write_report

    t0 = time.perf_counter()
    model_dir, corpus_dir, out_dir = Path(model_dir), Path(corpus_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ScmmError(f"output {out_dir} exists and is not a folder")
    if not model_dir.exists():
        raise ScmmError(f"model folder not found: {model_dir}")
    tasks = parse_tasks(tasks) if tasks is not None else default_tasks(model_dir)
    corpus = Corpus(corpus_dir)
    splits = dict(corpus.manifest["splits"])
    if splits.get("test", 0) <= 0:
        raise ScmmError(f"corpus {corpus_dir} has an empty test split: nothing to evaluate")
    if "annotate" in tasks and splits.get("train", 0) < 2:
        raise ScmmError(f"corpus {corpus_dir} has {splits.get('train', 0)} train cells: the baselines need at least 2")
    label_list = read_labels_option(labels)
    if label_list is not None and "annotate" not in tasks:
        raise ScmmError("labels are candidate labels for the annotate task, which is not among the tasks")
    ontology = get_ontology()
    cands = resolve_candidates(label_list, corpus, ontology)
    opened = _open_model(model_dir, tasks)
    model, loader_cfg, loader_source = opened.aligner, opened.loader_cfg, opened.loader_source
    _check_vocab(model.vocab, corpus)
    torch.manual_seed(seed)
    log.info("evaluating %s on %s: tasks %s", model_dir, corpus_dir, ", ".join(tasks))

    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_dir)
    ok = False
    try:
        metrics: dict[str, Any] = {}
        details: dict[str, Any] = {"notes": []}
        with torch.no_grad():
            test = _embed(model, corpus, "test", loader_cfg, progress)
            if "annotate" in tasks:
                m, d = _annotate(model, corpus, cands, loader_cfg, ontology, seed, tmp, progress, test)
                metrics.update(m)
                details["annotation"] = d
                details["notes"] += d.pop("notes")
            if "retrieve" in tasks:
                metrics["retrieval"] = _retrieve(model, test)
            if "describe" in tasks:
                from scmm.eval.stage2 import generation_report
                metrics["generation"], details["generation_examples"] = generation_report(
                    opened.stage2, corpus, "test", ontology, progress=progress, n_examples=EXAMPLES)
            if "generate" in tasks:
                metrics["pseudocell"] = _generate(opened, corpus, seed)
                details["notes"] += metrics["pseudocell"].pop("notes", [])
        metrics = _json_safe(metrics)
        context = {
            "model": str(model_dir), "corpus": str(corpus_dir), "out": str(out_dir), "tasks": list(tasks),
            "seed": seed, "splits": splits, "split_seed": corpus.manifest.get("split_seed"),
            "split_group_by": corpus.manifest.get("split_group_by"), "n_cell_types": len(corpus.cell_types),
            "loader": asdict(replace(loader_cfg)), "loader_source": loader_source,
            "labels": "user list" if label_list is not None else "corpus cell types",
            **details, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        write_report(metrics, tmp, context)
        written = [p.name for p in tmp.iterdir()]
        _publish(tmp, out_dir, written)
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:  # leave no empty parent folders behind either
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    break
    log.info("wrote %s (%.1f s)", out_dir, time.perf_counter() - t0)
    return metrics
