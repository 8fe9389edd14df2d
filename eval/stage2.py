"""Stage-2 evaluation: descriptions and cell-type answers (cell -> text), pseudo-cells (text -> cell).

* :func:`describe_split`: for every cell of a split, the generated description (task ``describe``) and the
  generated answer to the cell-type question (task ``cell_type``, optionally constrained to Cell Ontology names),
  with the references (the cell's own text, its CL ID) and the CL ID read from each answer.
* :func:`generation_metrics`: BLEU-4 / ROUGE-L of the descriptions (:func:`eval.metrics.text_generation_metrics`),
  ``type_accuracy`` (the CL ID read from the answer equals the cell's; an answer that names no CL term is wrong)
  and the mean ontology path score.
* :func:`scored_answers` / :func:`scored_report`: the LLM as a classifier over the corpus's cell types: the
  log-probability of each candidate's Cell Ontology label as the answer to the cell-type question (teacher-forced,
  :meth:`scmm.model.stage2.Stage2Model.answer_logprobs`), calibrated and backed off exactly as the annotation by
  text is (:mod:`scmm.eval.calibration`: temperature and back-off margin chosen on the val split). Reported as
  ``generation.scored``: ``accuracy``, ``lineage_accuracy`` (the answer is the truth or one of its ancestors),
  ``lineage_accuracy_backoff``, ``accuracy_backoff``, ``backoff_rate``, ``ece``, ``temperature``, ``margin``.
* :func:`pseudocells_for_types`: ``n_per_type`` pseudo-cells per cell type, generated from that type's
  description texts (cycled in sorted order), as log1p-CP10k profiles over the model's HVG panel.
* :func:`generation_report` / :func:`pseudocell_evaluation`: the ``generation`` and ``pseudocell`` sections of
  ``metrics.json`` that ``scmm eval`` writes (pseudo-cells scored by :func:`scmm.eval.pseudocell.pseudocell_report`);
  ``scmm eval --tasks describe,generate --split val`` computes both on val, for choosing hyper-parameters
  without touching the test split.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scmm.data_pipeline.instructions import UNSEEN_PROMPTS
from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus, label_keys
from scmm.eval.annotate import Candidates
from scmm.eval.calibration import Calibration, calibrated_answers, choose_margin, fit_temperature, softmax
from scmm.eval.metrics import (
    expected_calibration_error,
    lineage_accuracy,
    repeated_phrase_rate,
    text_generation_metrics,
)
from scmm.eval.ontology_score import mean_pair_score
from scmm.eval.pseudocell import REFERENCE_SPLITS, pseudocell_report
from scmm.model.stage2 import Stage2Model

log = logging.getLogger("scmm.eval.stage2")


def _loader(model: Stage2Model, corpus: Corpus, split: str, batch_size: int) -> CorpusLoader:
    aligner = model.aligner
    return CorpusLoader(corpus, split, LoaderConfig.inference(batch_size), aligner.encoding, aligner.vocab,
                        training=False)


@torch.no_grad()
def describe_split(model, corpus: Corpus, split: str = "test", constrained: bool = False, num_beams: int = 1,
                   describe: bool = True, batch_size: int = 64, max_cells: int | None = None,
                   progress: bool = False, type_prompts: Sequence[str] | None = None,
                   no_repeat_ngram_size: int | None = None, answers: bool = True) -> dict[str, list]:
    """Generated descriptions and cell-type answers for the cells of ``split`` (loader order).

    Returns lists: ``cell_id``, ``true_cl`` (label keys), ``references`` (the cells' texts), ``descriptions``
    (empty without ``describe``), ``type_answers``, ``pred_cl`` (CL ID read from each answer, or None).
    ``type_prompts``: ask the cell-type question in these phrasings instead (cell ``i`` of the split gets phrasing
    ``i % len``), e.g. :data:`~scmm.data_pipeline.instructions.UNSEEN_PROMPTS`. ``no_repeat_ngram_size``: the
    descriptions' decoding (default the model's, :data:`scmm.model.stage2.NO_REPEAT_NGRAM_SIZE`; 0 = the raw
    decoder). ``answers=False`` skips the cell-type answers (empty lists).
    """
    dec = {} if no_repeat_ngram_size is None else {"no_repeat_ngram_size": int(no_repeat_ngram_size)}
    out: dict[str, list] = {k: [] for k in ("cell_id", "true_cl", "references", "descriptions", "type_answers",
                                            "pred_cl")}
    batches = tqdm(_loader(model, corpus, split, batch_size), desc=f"describe {split}", unit="batch",
                   disable=None if progress else True)
    for batch in batches:
        if max_cells is not None and len(out["cell_id"]) >= max_cells:
            break
        out["cell_id"] += [str(c) for c in batch["cell_id"]]
        out["true_cl"] += label_keys(batch["cell_type_ontology_term_id"], batch["cell_type"])
        out["references"] += [str(t) for t in batch["text"]]
        if describe:
            out["descriptions"] += model.describe_cells(batch, task="describe", num_beams=num_beams, **dec)
        if not answers:
            continue
        if type_prompts:
            answers = _answers_in_phrasings(model, batch, type_prompts, len(out["type_answers"]), constrained,
                                            num_beams)
        else:
            answers = model.describe_cells(batch, task="cell_type", constrained=constrained, num_beams=num_beams)
        out["type_answers"] += answers
        out["pred_cl"] += [model.answer_to_cl(a) for a in answers]
    if max_cells is not None:
        out = {k: v[:max_cells] for k, v in out.items()}
    return out


def seen_types_only(result: dict[str, list], holdout_types: Sequence[str]) -> dict[str, list]:
    """The rows of a :func:`describe_split` result whose true type is not a held-out one (the corpus's
    ``--holdout-types``: the LLM never read them, so neither their answers nor their descriptions can be right)."""
    keep = [t not in set(holdout_types) for t in result["true_cl"]]
    return {k: [v for v, ok in zip(values, keep) if ok] if len(values) == len(keep) else values
            for k, values in result.items()}


def _answers_in_phrasings(model, batch: dict, prompts: Sequence[str], offset: int, constrained: bool,
                          num_beams: int) -> list[str]:
    """Cell-type answers where the cell at position ``offset + i`` of the split is asked ``prompts[(offset + i) %
    len(prompts)]`` (one generation per phrasing, over the cells asked it)."""
    n = len(batch["cell_id"])
    which = (offset + np.arange(n)) % len(prompts)
    answers = [""] * n
    for j, prompt in enumerate(prompts):
        rows = np.flatnonzero(which == j)
        if len(rows) == 0:
            continue
        sub = {k: batch[k][torch.as_tensor(rows)] for k in ("gene_ids", "values", "padding_mask")}
        for r, a in zip(rows, model.describe_cells(sub, task="cell_type", constrained=constrained,
                                                   num_beams=num_beams, prompt=prompt)):
            answers[r] = a
    return answers


def generation_metrics(result: dict[str, list], ontology=None) -> dict[str, float]:
    """``bleu4``, ``rougeL`` (descriptions vs the cells' texts), ``type_accuracy`` and ``ontology_score``."""
    out: dict[str, float] = {}
    if result["descriptions"]:
        text = text_generation_metrics(result["descriptions"], result["references"][:len(result["descriptions"])])
        out.update(bleu4=text["bleu4"], rougeL=text["rougeL"], bleu2=text["bleu2"], rouge1=text["rouge1"],
                   repeated_phrase_rate=repeated_phrase_rate(result["descriptions"]))
    true = np.asarray(result["true_cl"], dtype=object)
    pred = np.asarray([p if p else "unknown" for p in result["pred_cl"]], dtype=object)
    out["type_accuracy"] = float(np.mean(true == pred)) if len(true) else float("nan")
    out["valid_answer_rate"] = float(np.mean([p is not None for p in result["pred_cl"]])) if len(true) else 0.0
    ontology = ontology or get_ontology()
    out["ontology_score"] = mean_pair_score(true, pred, ontology, "path") if len(true) else float("nan")
    out["n_cells"] = int(len(true))
    return out


def candidate_answers(candidates: Candidates, ontology) -> list[str]:
    """The answer text of each candidate as stage 2 was trained on it: its Cell Ontology label, else its name."""
    return [ontology.label(c) if c and ontology.is_valid(c) else n for c, n in zip(candidates.cl_ids, candidates.names)]


@torch.no_grad()
def scored_answers(model, corpus: Corpus, split: str, answers: Sequence[str], batch_size: int = 64,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities [N, C] of each of ``answers`` to the cell-type question, label keys [N]) over the cells of
    ``split`` in loader order."""
    parts, truth = [np.zeros((0, len(answers)))], []
    for batch in tqdm(_loader(model, corpus, split, batch_size), desc=f"score answers {split}", unit="batch",
                      disable=None if progress else True):
        parts.append(model.answer_logprobs(batch, answers))
        truth += label_keys(batch["cell_type_ontology_term_id"], batch["cell_type"])
    return np.concatenate(parts), np.asarray(truth, dtype=object)


def scored_report(model, corpus: Corpus, split: str = "test", ontology=None, progress: bool = False
                  ) -> dict[str, Any] | None:
    """``generation.scored`` (module docstring) over the ``split`` cells of seen types (the candidates are the
    corpus's training types, :meth:`Candidates.from_corpus`); None without val cells of a candidate type."""
    ontology = ontology or get_ontology()
    cands = Candidates.from_corpus(corpus)
    answers = candidate_answers(cands, ontology)
    if corpus.manifest["splits"].get("val", 0) <= 0:
        return None
    index = {k: i for i, k in enumerate(cands.keys)}
    vlp, vtruth = scored_answers(model, corpus, "val", answers, progress=progress)
    ok = np.array([t in index for t in vtruth], dtype=bool)
    if not ok.any():
        return None
    temperature = fit_temperature(vlp[ok], [index[t] for t in vtruth[ok]])
    calibration = Calibration(temperature=temperature, margin=choose_margin(
        softmax(vlp[ok], temperature), cands.cl_ids, vtruth[ok], ontology))
    lp, truth = scored_answers(model, corpus, split, answers, progress=progress)
    seen = ~np.isin(truth.astype(str), list(corpus.holdout_types))
    a = calibrated_answers(lp[seen], cands.keys, cands.names, cands.cl_ids, calibration, ontology)
    truth, top = truth[seen], np.asarray(cands.keys, dtype=object)[a.top]
    return {"n_cells": int(len(truth)), "n_val_cells": int(ok.sum()), "temperature": temperature,
            "margin": calibration.margin, "accuracy": float(np.mean(top == truth)),
            "lineage_accuracy": lineage_accuracy(truth, top, ontology),
            "lineage_accuracy_backoff": lineage_accuracy(truth, a.keys, ontology),
            "accuracy_backoff": float(np.mean(a.keys == truth)), "backoff_rate": float(np.mean(a.keys != top)),
            "ece": expected_calibration_error(a.confidence, top == truth)}


def scored_calibration(metrics: Mapping[str, Any] | None) -> Calibration | None:
    """The temperature and back-off margin of ``generation.scored`` in a ``metrics.json`` dict (what ``scmm
    describe --cell-type`` applies), or None when it has none."""
    sc = ((metrics or {}).get("generation") or {}).get("scored")
    if not isinstance(sc, Mapping) or "temperature" not in sc:
        return None
    return Calibration(temperature=float(sc["temperature"]), margin=float(sc.get("margin", 0.0)))


def type_texts(corpus: Corpus, splits: Sequence[str] = ("train",)) -> dict[str, list[str]]:
    """Label key -> sorted distinct description texts of that type's cells in ``splits``."""
    texts: dict[str, set] = {}
    for split in splits:
        for shard in corpus.iter_shards(split, columns=("text", "cell_type_ontology_term_id", "cell_type")):
            for key, text in zip(label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"]),
                                 shard.obs["text"]):
                texts.setdefault(key, set()).add(str(text))
    return {k: sorted(v) for k, v in sorted(texts.items())}


def pseudocells_for_types(model, corpus: Corpus, n_per_type: int = 20, seed: int = 0,
                          types: Sequence[str] | None = None, text_splits: Sequence[str] = ("train",)
                          ) -> tuple[np.ndarray, list[str], list[str]]:
    """(X [n_types * n_per_type, G], label keys, HVG gene symbols): pseudo-cells from each type's texts."""
    by_type = type_texts(corpus, text_splits)
    types = sorted(by_type) if types is None else [t for t in types if t in by_type]
    x, labels = pseudocells_from_texts(model, {t: by_type[t] for t in types}, n_per_type, seed)
    return x, labels, list(model.hvg["symbols"])


def pseudocells_from_texts(model, texts_by_type: dict[str, list[str]], n_per_type: int, seed: int
                           ) -> tuple[np.ndarray, list[str]]:
    """(X [n_types * n_per_type, G], label keys): ``n_per_type`` pseudo-cells per type (in the dict's order), from
    its texts cycled in order."""
    texts, labels = [], []
    for t, pool in texts_by_type.items():
        texts += [pool[i % len(pool)] for i in range(n_per_type)]
        labels += [t] * n_per_type
    x = model.generate_pseudocells(texts, 1, seed=seed) if texts else np.zeros((0, len(model.hvg["indices"])))
    return x, labels


def generation_report(model, corpus: Corpus, split: str = "test", ontology=None, num_beams: int = 1,
                      progress: bool = False, n_examples: int = 8, collect: dict | None = None
                      ) -> tuple[dict[str, Any], list[dict]]:
    """The ``generation`` section of ``metrics.json`` (free and constrained type answers) and a few examples, over
    the ``split`` cells of seen types (:func:`seen_types_only`). ``repeated_phrase_rate`` is that of the default
    decoding (no repeated token n-grams), ``repeated_phrase_rate_raw`` that of the raw greedy decoder.
    ``collect``: filled with the per-cell results (cell IDs, descriptions, answers) of the default decoding."""
    held = corpus.holdout_types
    free = seen_types_only(describe_split(model, corpus, split, constrained=False, num_beams=num_beams,
                                          describe=True, progress=progress), held)
    if collect is not None:
        collect.update(free)
    out = generation_metrics(free, ontology)
    raw = seen_types_only(describe_split(model, corpus, split, num_beams=num_beams, progress=progress,
                                         no_repeat_ngram_size=0, answers=False), held)
    if raw["descriptions"]:
        out["repeated_phrase_rate_raw"] = repeated_phrase_rate(raw["descriptions"])
    constrained = generation_metrics(seen_types_only(describe_split(
        model, corpus, split, constrained=True, num_beams=num_beams, describe=False, progress=progress), held),
        ontology)
    unseen = generation_metrics(seen_types_only(describe_split(
        model, corpus, split, num_beams=num_beams, describe=False, progress=progress,
        type_prompts=UNSEEN_PROMPTS["cell_type"]), held), ontology)
    out.update(type_accuracy_unseen_phrasing=unseen["type_accuracy"],
               ontology_score_unseen_phrasing=unseen["ontology_score"],
               valid_answer_rate_unseen_phrasing=unseen["valid_answer_rate"])
    out.update(type_accuracy_constrained=constrained["type_accuracy"],
               ontology_score_constrained=constrained["ontology_score"],
               valid_answer_rate_constrained=constrained["valid_answer_rate"], split=split, num_beams=int(num_beams))
    scored = scored_report(model, corpus, split, ontology, progress)
    if scored is not None:
        out["scored"] = scored
    examples = [{"cell_id": c, "true": t, "reference": r, "description": d, "type_answer": a}
                for c, t, r, d, a in zip(free["cell_id"], free["true_cl"], free["references"], free["descriptions"],
                                         free["type_answers"])][:n_examples]
    return out, examples


def ontology_phrasings(types: Sequence[str], ontology=None) -> dict[str, list[str]]:
    """Label key -> texts about that cell type that training never shows, built offline from the Cell Ontology:
    each exact synonym ("A CD14-positive, CD16-negative classical monocyte.") and the definition alone (training
    texts open with the type's label). Types without a CL term, synonyms or definition get none."""
    ontology = ontology or get_ontology()
    out: dict[str, list[str]] = {}
    for key in types:
        if not (key.startswith("CL:") and ontology.is_valid(key)):
            continue
        label = ontology.label(key).lower()
        texts = [f"A {s}." for s in ontology.synonyms(key) if s.lower() != label]
        definition = ontology.definition(key)
        if definition:
            texts.append(definition)
        if texts:
            out[key] = sorted(dict.fromkeys(texts))
    return out


def pseudocell_evaluation(model, corpus: Corpus, seed: int = 0, n_per_type: int = 20, k: int = 5,
                          reference_splits: Sequence[str] = REFERENCE_SPLITS, ontology=None) -> dict[str, Any]:
    """The ``pseudocell`` section: pseudo-cells of every type scored by
    :func:`scmm.eval.pseudocell.pseudocell_report` in expression-PCA space and in the stage-1 embedding space, with
    the class-mean reference and random baseline; and pseudo-cells from texts training never saw
    (:func:`ontology_phrasings`) scored the same way (``knn_accuracy_unseen_phrasing``, ``unseen_phrasing``).
    ``reference_splits``: the real cells scored against (default val and test; val alone for tuning).
    """
    genes = np.asarray(model.hvg["indices"], dtype=np.int64)
    x, labels, _ = pseudocells_for_types(model, corpus, n_per_type=n_per_type, seed=seed)
    unseen = ontology_phrasings(sorted(set(labels)), ontology)
    extra = {"unseen_phrasing": pseudocells_from_texts(model, unseen, n_per_type, seed)} if unseen else {}
    out = pseudocell_report(corpus, x, labels, genes, k=k, seed=seed, aligner=model.aligner,
                            reference_splits=reference_splits, extra=extra)
    scored = out.pop("extra")
    if unseen:
        out["knn_accuracy_unseen_phrasing"] = scored["unseen_phrasing"]["expression_pca"]
        out["unseen_phrasing"] = {"spaces": {s: {"knn_accuracy": v} for s, v in scored["unseen_phrasing"].items()},
                                  "n_types": len(unseen), "texts_per_type": {t: len(v) for t, v in unseen.items()}}
    return out
