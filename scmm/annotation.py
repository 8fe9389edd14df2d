"""The annotation policy: how a cell's embedding becomes a label, a confidence, a back-off level and "unknown".

Each candidate label's prototype is the mean text embedding of its label texts; a cell's similarity to a label is
the cosine between its embedding and the prototype; the confidence is the top-1 probability of
``softmax(cosine / T)`` with the temperature ``scmm eval`` fitted on val, abstention and back-off as it chose
(:func:`model_calibration`, :mod:`scmm.eval.calibration`); the novelty check compares the cells' expression with
the training cells' (:mod:`scmm.eval.novelty`). Also the k-NN vote of ``query_index`` and the stage-2 LLM's
scored cell-type answer of ``describe --cell-type``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.scale import to_linear
from scmm.errors import ScmmError
from scmm.eval import knn
from scmm.eval.annotate import Candidates, label_prototypes, read_labels_option
from scmm.eval.calibration import Calibration, calibrated_answers, check_unknown_options, report_novelty, softmax
from scmm.eval.novelty import ExpressionNovelty
from scmm.eval.stage2 import candidate_answers, scored_calibration
from scmm.index import ReferenceIndex
from scmm.model.folders import ScmmModel
from scmm.output_names import CELL_TYPE, CELL_TYPE_ID, CONFIDENCE, LEVEL, NOVELTY, UNKNOWN

log = logging.getLogger("scmm")

__all__ = ["Labeller", "SMOOTH_K", "model_calibration", "annotate_embeddings", "annotator", "candidates_of",
           "qc_labels", "label_frame", "vote_labels", "llm_answerer", "check_threshold"]

Labeller = Callable[[int, np.ndarray], pd.DataFrame]  # (first row, those rows' embeddings) -> label columns
SMOOTH_K = 15


def candidates_of(model: ScmmModel, labels: str | Sequence[str] | None) -> Candidates:
    items = read_labels_option(labels)
    if items is not None:
        return Candidates.from_user(items, get_ontology())
    if not model.labels:
        raise ScmmError(f"model {model.folder} stores no candidate labels (a bare model folder whose training "
                        f"corpus was not found): pass --labels, or package the model with `scmm package`")
    return Candidates.from_labels(model.labels)


def _neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    index = knn.build_index(emb, "ip", approximate_above=knn.FLAT_MAX_CELLS)
    _, ids = knn.knn_search(index, emb, min(k, len(emb)))
    return ids


def model_calibration(model: ScmmModel, user_labels: bool, unknown_rate: float | None = None,
                      unknown_threshold: float | None = None) -> Calibration:
    """What annotation applies (:mod:`scmm.eval.calibration`): the temperature, abstention threshold and back-off
    margin that ``scmm eval`` chose on val and the package stores in its ``metrics.json``; else (a bare model
    folder, or a package from before calibration) the model's contrastive temperature, no abstention and no
    back-off. With the user's own candidate ``labels`` only the temperature is kept: the threshold and the margin
    were chosen for the training candidates (an explicit ``unknown_threshold`` still applies; ``unknown_rate``
    cannot, as the stored val confidences belong to the training candidates). The novelty check (a similarity
    threshold to the package's ``novelty_reference.npy``) is part of the stored calibration: off with ``labels``,
    with ``unknown_threshold`` and for a model without that file."""
    check_unknown_options(unknown_rate, unknown_threshold)
    stored = Calibration.from_metrics(model.metrics)
    if stored is None:
        scale = float(model.aligner.heads.get_logit_scale().detach().float().cpu())
        stored = Calibration(temperature=1.0 / scale)
    elif user_labels:
        stored = Calibration(temperature=stored.temperature)
    elif model.novelty_reference is None and stored.has_novelty:
        log.warning("model %s: its metrics record a novelty check but it holds no novelty reference: only the "
                    "confidence decides 'unknown'", model.folder)
        stored = stored.without_novelty()
    if user_labels and unknown_rate is not None:
        raise ScmmError("--unknown-rate applies to the model's own candidate labels (the val confidences it stores "
                        "belong to them); with --labels pass --unknown-threshold")
    return stored.with_options(unknown_rate, unknown_threshold)


def annotate_embeddings(emb: np.ndarray, model: ScmmModel, candidates: Candidates,
                        calibration: Calibration | None = None, smooth: bool = False,
                        k: int = SMOOTH_K) -> pd.DataFrame:
    """The annotation columns for embeddings ``emb`` (see the module docstring); ``calibration`` default
    :func:`model_calibration` for the model's own candidates. Without the cells' expression there is no novelty
    check (:func:`annotate` has one)."""
    return annotator(model, candidates, calibration, smooth, k)(0, emb)


def annotator(model: ScmmModel, candidates: Candidates, calibration: Calibration | None = None,
               smooth: bool = False, k: int = SMOOTH_K, inp: Any = None
               ) -> Labeller:
    """(first row, embeddings of the rows from it) -> annotation columns, the label prototypes computed once.
    Without ``smooth`` each cell's answer depends on its embedding (and, with the novelty check, on its
    expression, read back from ``inp``) alone, so chunks can be annotated one at a time."""
    calibration = calibration or model_calibration(model, user_labels=False)
    with torch.inference_mode():
        protos = label_prototypes(model.aligner, candidates)
    ontology = get_ontology()
    novelty = _novelty(model, inp)

    def run(start: int, emb: np.ndarray) -> pd.DataFrame:
        similarity = novelty(start, len(emb)) if novelty is not None else None
        sim = emb @ protos.T  # cosine similarities [N, C]
        prob = softmax(sim, calibration.temperature)
        if smooth and len(emb) > 1:
            nb = _neighbours(emb, k)
            valid = nb >= 0
            w = valid / valid.sum(1, keepdims=True)
            prob = np.einsum("nk,nkc->nc", w, prob[np.maximum(nb, 0)])
        answers = calibrated_answers(sim, candidates.keys, candidates.names, candidates.cl_ids, calibration,
                                     ontology, prob=prob, novelty=similarity)
        return label_frame(answers.names, answers.cl_ids, answers.confidence, answers.level, similarity)
    if novelty is not None:  # the file as a whole (scmm.eval.calibration.report_novelty), at the end
        run.novelty_summary = lambda sim, empty: report_novelty(sim, calibration, str(inp.source.path), empty)
    return run


def _novelty(model: ScmmModel, inp: Any) -> Callable[[int, int], np.ndarray] | None:
    """(first row, number of rows) -> those input cells' novelty similarities (:mod:`scmm.eval.novelty`), read
    chunk by chunk from the input; None without a novelty reference in the model or an input to read."""
    if model.novelty_reference is None or inp is None:
        return None
    try:
        novelty = ExpressionNovelty.from_arrays(model.novelty_reference)
    except ValueError as exc:
        raise ScmmError(f"model {model.folder}: {exc}") from None
    index = novelty.index()  # built once, searched per chunk

    def similarity(start: int, n: int) -> np.ndarray:
        parts = [np.zeros(0)]
        for first, block in inp.source.iter_chunks(inp.opts.chunk_size, start, start + n):
            block = to_linear(block, inp.scale, f"{inp.source.path} (rows from {first})")[:, inp.plan.columns]
            parts.append(novelty.similarity(novelty.profiles(block, inp.plan.vocab_ids), index))
        return np.concatenate(parts)
    return similarity


def check_threshold(value: float | None, low: float, high: float, what: str) -> None:
    if value is not None and not low <= value <= high:  # NaN fails both comparisons
        raise ScmmError(f"--unknown-threshold must be {what} in [{low:g}, {high:g}], got {value}")


def label_frame(cell_type: np.ndarray, cell_id: np.ndarray, conf: np.ndarray,
                 level: np.ndarray | None = None, novelty: np.ndarray | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({CELL_TYPE: pd.Categorical(cell_type.astype(str)),
                          CELL_TYPE_ID: pd.Categorical(cell_id.astype(str)),
                          CONFIDENCE: np.asarray(conf, dtype=np.float32)})
    if level is not None:
        frame[LEVEL] = np.asarray(level, dtype=np.int16)
    if novelty is not None:
        frame[NOVELTY] = np.asarray(novelty, dtype=np.float32)
    return frame


def qc_labels(obs: pd.DataFrame, empty: np.ndarray) -> pd.DataFrame:
    """Label columns with the cells that express no model gene called unknown (confidence 0)."""
    cell_type, cell_id = (obs[c].astype(str).to_numpy(dtype=object) for c in (CELL_TYPE, CELL_TYPE_ID))
    conf = obs[CONFIDENCE].to_numpy(copy=True)
    level = obs[LEVEL].to_numpy(copy=True) if LEVEL in obs else None
    novelty = obs[NOVELTY].to_numpy(copy=True) if NOVELTY in obs else None
    cell_type[empty], cell_id[empty], conf[empty] = UNKNOWN, UNKNOWN, 0.0
    if level is not None:
        level[empty] = 0
    if novelty is not None:
        novelty[empty] = 0.0
    return label_frame(cell_type, cell_id, conf, level, novelty)


def vote_labels(index: ReferenceIndex, emb: np.ndarray, k: int, unknown_threshold: float | None) -> pd.DataFrame:
    code, conf = index.vote(emb, k)
    classes = index.classes
    names = np.array([c["label"] for c in classes] + [UNKNOWN], dtype=object)
    ids = np.array([c["cell_type_ontology_term_id"] for c in classes] + [UNKNOWN], dtype=object)
    code = np.where(code >= 0, code, len(classes))
    cell_type, cell_id = names[code], ids[code]
    if unknown_threshold is not None:
        unknown = conf < unknown_threshold
        cell_type[unknown], cell_id[unknown] = UNKNOWN, UNKNOWN
    return label_frame(cell_type, cell_id, conf)


def llm_answerer(model: ScmmModel) -> Callable[[dict], tuple]:
    """batch -> (names, CL IDs, confidences, back-off levels) of the stage-2 LLM's answer to the cell-type question,
    scored over the model's candidate labels (:func:`scmm.eval.stage2.scored_answers`) and calibrated and backed
    off with what ``scmm eval`` chose on val (``generation.scored``; without it: temperature 1, no back-off)."""
    candidates = candidates_of(model, None)
    ontology = get_ontology()
    answers = candidate_answers(candidates, ontology)
    calibration = scored_calibration(model.metrics)
    if calibration is None:
        log.warning("model %s: its metrics hold no calibration of the LLM's answers (generation.scored): "
                    "confidence at temperature 1, no back-off", model.folder)
        calibration = Calibration(temperature=1.0)

    def run(batch: dict) -> tuple:
        logp = model.stage2.answer_logprobs(batch, answers)
        a = calibrated_answers(logp, candidates.keys, candidates.names, candidates.cl_ids, calibration, ontology)
        return a.names, a.cl_ids, a.confidence, a.level
    return run
