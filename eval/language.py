"""Faithfulness of scmm's language about each cell, checked against the cell's per-cell facts (``language.*``).

The facts (:mod:`scmm.data_pipeline.facts`) are the corpus's standardised hallmark program scores and marker genes;
the claims are read with the closed-vocabulary parser :func:`scmm.data_pipeline.fact_text.parse_claims`. Over the
**test** cells of seen types:

* ``program_claims``: the programs a generated description names against the cell's top-3 programs: ``precision``
  (named programs that are among them, over all named), ``recall`` (over 3 per cell), ``f1``; ``f1_within_type``:
  the F1 over each cell type's cells, averaged over types; ``baseline_f1_within_type``: the same for the
  *type-template* baseline, which names, for every cell of a type, the three programs most often among the top 3 of
  that type's training cells (what a description could say from the label alone).
* ``marker_claims``: ``precision``: named genes that are among the cell's top-20 over-expressed genes, over all
  genes named; ``baseline_precision``: the type template's three most frequent training markers; ``unknown_rate``:
  named symbols that are not corpus genes.
* ``search`` (stage-1 space): per program, the test cells ranked by cosine similarity to the text "cells with high
  <program> activity"; ``auroc`` against the cell's true score being in the top quartile of the test cells, mean
  over programs; ``auroc_within_type``: the same within each type (its own top quartile; types with at least
  :data:`MIN_TYPE_CELLS` cells), mean over (type, program).
* ``text_to_cell``: pseudo-cells from "<type> with high <program> activity" and "<type> with low <program>
  activity" for every seen type and program; per program the AUROC of the pseudo-cells' program score (high vs
  low, every type pooled), mean over programs. A pseudo-cell's score is the mean gene z-score (the corpus's
  training mean/sd) over the set's genes in the model's HVG panel (programs with at least
  :data:`MIN_HVG_SET_GENES` of them).
* ``answers`` (with a stage-2 model): the same claim figures for the LLM's answers to "Which programs are active in
  this cell?" (``program_claims``) and "Which genes does it express highly?" (``marker_claims``); and
  ``ranked_programs``: what the LLM knows of the cell's programs, free of decoding: every program is scored as the
  answer "Its most active programs are <program>." to that question (its log-probability with teacher forcing),
  and the 3 likeliest are checked against the cell's top 3: ``precision`` (``precision_within_type``: mean over
  types), beside ``baseline_precision`` (the type template) and ``chance`` (3 over the number of programs, at
  most 1). A model that garbles its answers but ranks well learnt the facts and fails at decoding; one at chance
  did not learn them.
* ``reader`` (a stage-2 model with ``bridge.programs`` or ``bridge.markers``): what the LLM's prompt is told of the
  cell, checked like the claims: the program reader's predicted activities (the prompt is told their top 3),
  scored like ``search`` (``auroc``, ``auroc_within_type``) and by the precision of its 3 highest programs against
  the cell's top 3 (``top_precision``, ``top_precision_within_type``); the marker reader's 3 genes by the
  precision against the cell's top-20 markers (``marker_precision``). What the descriptions could state at best
  through that input.
* ``n_programs``, ``n_cells``.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scmm.data_pipeline.fact_text import (
    N_CAPTION_MARKERS,
    fact_sentence,
    parse_claims,
    program_query,
    type_program_query,
)
from scmm.data_pipeline.store import Corpus, label_keys
from scmm.eval.metrics import binary_auroc
from scmm.eval.stage2 import _loader

log = logging.getLogger("scmm.eval.language")

__all__ = ["SplitFacts", "split_facts", "claim_metrics", "type_templates", "search_metrics", "text_to_cell_metrics",
           "ranked_programs", "ranked_metrics", "reader_metrics", "program_aurocs", "TOP_PROGRAMS", "TOP_MARKERS",
           "MIN_TYPE_CELLS", "MIN_HVG_SET_GENES"]

TOP_PROGRAMS = 3
TOP_MARKERS = 20
MIN_TYPE_CELLS = 8
MIN_HVG_SET_GENES = 3
PSEUDOCELLS_PER_TEXT = 4


@dataclass
class SplitFacts:
    """The facts of one split in shard order."""

    cell_ids: list[str]
    types: np.ndarray  # label keys
    labels: np.ndarray  # cell-type labels (corpus "cell_type")
    scores: np.ndarray  # [N, P]
    markers: np.ndarray  # [N, K] panel indices, -1 padded
    programs: list[str]
    symbols: np.ndarray  # panel symbols

    def top_programs(self, k: int = TOP_PROGRAMS) -> list[list[str]]:
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return [[self.programs[p] for p in row] for row in order]

    def marker_symbols(self, k: int) -> list[list[str]]:
        return [[str(self.symbols[g]) for g in row[:k] if g >= 0] for row in self.markers]


def split_facts(corpus: Corpus, split: str) -> SplitFacts:
    """The facts of ``split`` (the corpus must have them)."""
    ids, types, labels, scores, markers = [], [], [], [], []
    for entry in corpus.shards(split):
        shard = corpus.read_shard(entry["name"], ("cell_id", "cell_type_ontology_term_id", "cell_type"))
        s, m = corpus.read_facts(entry["name"])
        ids += [str(c) for c in shard.obs["cell_id"]]
        types += label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"])
        labels += [str(x) for x in shard.obs["cell_type"]]
        scores.append(s)
        markers.append(m)
    facts = corpus.facts or {}
    p = len(facts["programs"]["names"])
    k = int(facts["markers"]["n_stored"])
    return SplitFacts(ids, np.asarray(types, dtype=object), np.asarray(labels, dtype=object),
                      np.concatenate(scores) if scores else np.zeros((0, p), np.float32),
                      np.concatenate(markers) if markers else np.zeros((0, k), np.int32),
                      list(facts["programs"]["names"]), corpus.gene_symbols)


def type_templates(train: SplitFacts) -> dict[str, tuple[list[str], list[str]]]:
    """Per type: (its 3 programs most often in the training cells' top 3, its 3 most frequent training markers
    among their first :data:`N_CAPTION_MARKERS`), ties broken by name."""
    out = {}
    tops, marks = train.top_programs(), train.marker_symbols(N_CAPTION_MARKERS)
    for t in sorted(set(train.types)):
        rows = np.flatnonzero(train.types == t)
        pc = Counter(p for r in rows for p in tops[r])
        mc = Counter(g for r in rows for g in marks[r])
        out[t] = ([p for p, _ in sorted(pc.items(), key=lambda x: (-x[1], x[0]))[:TOP_PROGRAMS]],
                  [g for g, _ in sorted(mc.items(), key=lambda x: (-x[1], x[0]))[:N_CAPTION_MARKERS]])
    return out


def _prf(claimed: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]) -> tuple[float, float, float]:
    hits = sum(len(set(c) & set(t)) for c, t in zip(claimed, truth))
    n_claimed = sum(len(c) for c in claimed)
    n_true = sum(len(t) for t in truth)
    precision = hits / n_claimed if n_claimed else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def _within_type(claimed, truth, types: np.ndarray) -> float:
    f1s = []
    for t in sorted(set(types)):
        rows = np.flatnonzero(types == t)
        f1s.append(_prf([claimed[r] for r in rows], [truth[r] for r in rows])[2])
    return float(np.mean(f1s)) if f1s else float("nan")


def claim_metrics(texts: Sequence[str], test: SplitFacts, templates: Mapping[str, tuple[list[str], list[str]]]
                  ) -> dict[str, dict[str, float]]:
    """``program_claims`` and ``marker_claims`` of ``texts`` (one per cell of ``test``, same order)."""
    claims = [parse_claims(str(t)) for t in texts]
    programs = [c.programs for c in claims]
    truth = test.top_programs()
    p, r, f1 = _prf(programs, truth)
    base = [list(templates.get(t, ([], []))[0]) for t in test.types]
    top20 = test.marker_symbols(TOP_MARKERS)
    genes = [c.genes for c in claims]
    n_named = sum(len(g) for g in genes)
    known = set(map(str, test.symbols))
    base_genes = [list(templates.get(t, ([], []))[1]) for t in test.types]
    n_base = sum(len(g) for g in base_genes)
    return {
        "program_claims": {"precision": p, "recall": r, "f1": f1,
                           "f1_within_type": _within_type(programs, truth, test.types),
                           "baseline_f1_within_type": _within_type(base, truth, test.types),
                           "baseline_f1": _prf(base, truth)[2],
                           "claims_per_cell": sum(map(len, programs)) / max(len(programs), 1)},
        "marker_claims": {
            "precision": sum(len(set(g) & set(t)) for g, t in zip(genes, top20)) / n_named if n_named else 0.0,
            "baseline_precision": (sum(len(set(g) & set(t)) for g, t in zip(base_genes, top20)) / n_base
                                   if n_base else 0.0),
            "unknown_rate": sum(x not in known for g in genes for x in g) / n_named if n_named else 0.0,
            "claims_per_cell": n_named / max(len(genes), 1)},
    }


def _top_quartile(values: np.ndarray) -> np.ndarray:
    return values >= np.quantile(values, 0.75)


def search_metrics(cell_embeddings: np.ndarray, text_features: np.ndarray, test: SplitFacts) -> dict[str, float]:
    """``search``: ``cell_embeddings`` [N, D] (L2-normalised, the order of ``test``), ``text_features`` [P, D] of
    :func:`program_query` for each program (same order as ``test.programs``)."""
    return program_aurocs(cell_embeddings @ text_features.T, test)


def program_aurocs(sim: np.ndarray, test: SplitFacts) -> dict[str, float]:
    """Mean over programs of the AUROC of ``sim[:, p]`` (any per-cell score of program ``p``, ``[N, P]`` in the
    order of ``test`` and ``test.programs``) for the cell's true score being in the top quartile, over all cells
    and within each type of at least :data:`MIN_TYPE_CELLS` cells."""
    overall, within = [], []
    types = sorted(set(test.types))
    for p in range(len(test.programs)):
        hi = _top_quartile(test.scores[:, p])
        if hi.all() or not hi.any():
            continue
        overall.append(binary_auroc(sim[hi, p], sim[~hi, p]))
        for t in types:
            rows = np.flatnonzero(test.types == t)
            if len(rows) < MIN_TYPE_CELLS:
                continue
            h = _top_quartile(test.scores[rows, p])
            if h.all() or not h.any():
                continue
            within.append(binary_auroc(sim[rows[h], p], sim[rows[~h], p]))
    return {"auroc": float(np.mean(overall)) if overall else float("nan"),
            "auroc_within_type": float(np.mean(within)) if within else float("nan"),
            "n_programs": len(overall), "n_type_programs": len(within)}


def hvg_program_scorer(arrays: Mapping[str, np.ndarray], programs: Sequence[str], hvg: Sequence[int]):
    """(programs kept, function [n, G_hvg] log1p profiles -> [n, kept] scores): mean gene z-score over each set's
    genes in the HVG panel (:data:`MIN_HVG_SET_GENES` or more)."""
    hvg = np.asarray(hvg, dtype=np.int64)
    pos = {int(g): i for i, g in enumerate(hvg)}
    mean, sd = arrays["gene_mean"][hvg], arrays["gene_sd"][hvg]
    ptr, genes = arrays["program_indptr"], arrays["program_genes"]
    kept, cols = [], []
    for i in range(len(programs)):
        c = [pos[int(g)] for g in genes[ptr[i]:ptr[i + 1]] if int(g) in pos and sd[pos[int(g)]] > 0]
        if len(c) >= MIN_HVG_SET_GENES:
            kept.append(i)
            cols.append(np.asarray(c))

    def score(x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - mean) / np.where(sd > 0, sd, 1.0)
        return np.stack([z[:, c].mean(axis=1) for c in cols], axis=1) if cols else np.zeros((len(x), 0))
    return kept, score


def text_to_cell_metrics(stage2, arrays: Mapping[str, np.ndarray], programs: Sequence[str],
                         type_labels: Mapping[str, str], seed: int = 0) -> dict[str, float]:
    """``text_to_cell`` (module docstring): ``type_labels`` maps each seen type's key to the label its texts use."""
    kept, score = hvg_program_scorer(arrays, programs, stage2.hvg["indices"])
    texts, which = [], []
    for label in type_labels.values():
        for j, p in enumerate(kept):
            for high in (True, False):
                texts.append(type_program_query(label, programs[p], high))
                which.append((j, high))
    if not texts:
        return {"auroc": float("nan"), "n_programs": 0}
    x = stage2.generate_pseudocells(texts, PSEUDOCELLS_PER_TEXT, seed=seed)
    s = score(x)
    j_of = np.repeat([w[0] for w in which], PSEUDOCELLS_PER_TEXT)
    high = np.repeat([w[1] for w in which], PSEUDOCELLS_PER_TEXT)
    aurocs = [binary_auroc(s[(j_of == j) & high, j], s[(j_of == j) & ~high, j]) for j in range(len(kept))]
    return {"auroc": float(np.mean(aurocs)), "n_programs": len(kept), "n_types": len(type_labels),
            "pseudocells_per_text": PSEUDOCELLS_PER_TEXT}


def type_examples(corpus: Corpus, descriptions: Mapping[str, str], n: int = 5) -> list[dict]:
    """Up to ``n`` test cells of the most common seen test type whose generated descriptions differ, each with its
    description and its true top programs and first markers (for the report)."""
    if corpus.facts is None or not descriptions:
        return []
    test = split_facts(corpus, "test")
    held = set(corpus.holdout_types)
    counts = Counter(t for t, c in zip(test.types, test.cell_ids) if t not in held and c in descriptions)
    if not counts:
        return []
    kind = sorted(counts.items(), key=lambda x: (-x[1], x[0]))[0][0]
    tops, marks = test.top_programs(), test.marker_symbols(N_CAPTION_MARKERS)
    out, seen = [], set()
    for i, c in enumerate(test.cell_ids):
        if test.types[i] != kind or c not in descriptions or descriptions[c] in seen:
            continue
        seen.add(descriptions[c])
        out.append({"cell_id": c, "type": str(test.labels[i]), "description": descriptions[c],
                    "top_programs": tops[i], "markers": marks[i]})
        if len(out) == n:
            break
    return out


def fact_answers(stage2, corpus: Corpus, split: str, task: str, batch_size: int = 64) -> dict[str, str]:
    """Cell ID -> the LLM's answer to the ``task`` question ("programs" or "markers") for the cells of ``split``."""
    out: dict[str, str] = {}
    for batch in _loader(stage2, corpus, split, batch_size):
        out.update(zip((str(c) for c in batch["cell_id"]), stage2.describe_cells(batch, task=task,
                                                                                max_new_tokens=64)))
    return out


def ranked_programs(stage2, corpus: Corpus, split: str, programs: Sequence[str], k: int = TOP_PROGRAMS,
                    batch_size: int = 64) -> dict[str, list[str]]:
    """Cell ID -> the ``k`` programs the LLM finds likeliest as the answer to the programs question (module
    docstring, ``ranked_programs``), for the cells of ``split``."""
    answers = [fact_sentence([p], [], 0) for p in programs]
    out: dict[str, list[str]] = {}
    for batch in _loader(stage2, corpus, split, batch_size):
        logp = stage2.answer_logprobs(batch, answers, task="programs")
        top = np.argsort(-logp, axis=1, kind="stable")[:, :k]
        out.update((str(c), [programs[j] for j in row]) for c, row in zip(batch["cell_id"], top))
    return out


def reader_metrics(stage2, corpus: Corpus, split: str, cells: SplitFacts, batch_size: int = 64) -> dict[str, float]:
    """``reader``: what the stage-2 readers read of the cells of ``split`` (``cells``, a subset), against their
    facts: the program reader's predicted activities (``bridge.programs``) by AUROC as :func:`program_aurocs` and
    the precision of its top programs against the true top programs (over all cells and within type); the marker
    reader's genes (``bridge.markers``) by the share that are among the cell's top-20 markers."""
    want = set(cells.cell_ids)
    predicted: dict[str, np.ndarray] = {}
    genes: dict[str, list[str]] = {}
    cols = [{p: j for j, p in enumerate(stage2.program_names)}[p] for p in cells.programs] \
        if stage2.reader is not None else []
    for batch in _loader(stage2, corpus, split, batch_size):
        ids = [str(c) for c in batch["cell_id"]]
        if not want.intersection(ids):
            continue
        if stage2.reader is not None:
            predicted.update(zip(ids, stage2.predict_programs(batch)[:, cols]))
        if stage2.markers is not None:
            genes.update(zip(ids, ([s for s, _ in row] for row in stage2.predict_markers(batch))))
    out: dict[str, float] = {}
    if stage2.reader is not None:
        scores = np.stack([predicted[c] for c in cells.cell_ids])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_PROGRAMS]
        ranked = ranked_metrics([[cells.programs[j] for j in row] for row in top], cells, {})
        out.update(program_aurocs(scores, cells), top_precision=ranked["precision"],
                   top_precision_within_type=ranked["precision_within_type"])
    if stage2.markers is not None:
        top20 = cells.marker_symbols(TOP_MARKERS)
        hits = [(g in set(truth)) for c, truth in zip(cells.cell_ids, top20) for g in genes[c]]
        out["marker_precision"] = float(np.mean(hits)) if hits else float("nan")
    return out


def ranked_metrics(ranked: Sequence[Sequence[str]], test: SplitFacts,
                   templates: Mapping[str, tuple[list[str], list[str]]]) -> dict[str, float]:
    """``answers.ranked_programs`` of ``ranked`` (the LLM's top programs, one list per cell of ``test``)."""
    truth = test.top_programs()
    base = [list(templates.get(t, ([], []))[0]) for t in test.types]
    within = []
    for t in sorted(set(test.types)):
        rows = np.flatnonzero(test.types == t)
        within.append(_prf([ranked[r] for r in rows], [truth[r] for r in rows])[0])
    return {"precision": _prf(ranked, truth)[0], "precision_within_type": float(np.mean(within)) if within else
            float("nan"), "baseline_precision": _prf(base, truth)[0],
            "chance": min(TOP_PROGRAMS, len(test.programs)) / len(test.programs) if test.programs else float("nan")}


def language_report(corpus: Corpus, *, embeddings: np.ndarray | None = None, embedded_ids: Sequence[str] | None = None,
                    text_features=None, descriptions: Mapping[str, str] | None = None, stage2=None,
                    answers_model=None, seed: int = 0) -> dict[str, Any]:
    """The ``language`` section of ``metrics.json`` over the test cells of seen types; ``{"absent": reason}`` for a
    corpus without facts. ``embeddings`` (shard order of the test split, ids ``embedded_ids``) with
    ``text_features`` (texts -> [n, D] L2-normalised) give ``search``; ``descriptions`` (cell ID -> generated
    text) give the claims; ``stage2`` gives ``text_to_cell``; ``answers_model`` (a stage-2 model) gives
    ``answers``."""
    if corpus.facts is None:
        return {"absent": "the corpus has no per-cell facts (built with --no-facts or before they existed)"}
    held = set(corpus.holdout_types)
    test = split_facts(corpus, "test")
    seen = np.array([t not in held for t in test.types], dtype=bool)
    out: dict[str, Any] = {"n_programs": len(test.programs), "n_cells": int(seen.sum())}
    sub = SplitFacts([c for c, ok in zip(test.cell_ids, seen) if ok], test.types[seen], test.labels[seen],
                     test.scores[seen], test.markers[seen], test.programs, test.symbols)
    if descriptions is not None:
        have = [c in descriptions for c in sub.cell_ids]
        if all(have):
            out.update(claim_metrics([descriptions[c] for c in sub.cell_ids], sub,
                                     type_templates(split_facts(corpus, "train"))))
        else:
            log.warning("language: %d test cells have no description; claims not scored", have.count(False))
    if embeddings is not None and text_features is not None and embedded_ids is not None:
        pos = {c: i for i, c in enumerate(embedded_ids)}
        if all(c in pos for c in sub.cell_ids) and len(sub.cell_ids):
            emb = np.asarray(embeddings)[[pos[c] for c in sub.cell_ids]]
            out["search"] = search_metrics(emb, np.asarray(text_features([program_query(p) for p in sub.programs])),
                                           sub)
    if answers_model is not None and len(sub.cell_ids):
        templates = type_templates(split_facts(corpus, "train"))
        programs = fact_answers(answers_model, corpus, "test", "programs")
        markers = fact_answers(answers_model, corpus, "test", "markers")
        out["answers"] = {
            "program_claims": claim_metrics([programs.get(c, "") for c in sub.cell_ids], sub,
                                            templates)["program_claims"],
            "marker_claims": claim_metrics([markers.get(c, "") for c in sub.cell_ids], sub, templates)["marker_claims"]}
        ranked = ranked_programs(answers_model, corpus, "test", sub.programs)
        out["answers"]["ranked_programs"] = ranked_metrics([ranked.get(c, []) for c in sub.cell_ids], sub, templates)
    if answers_model is not None and getattr(answers_model, "has_context", False) and len(sub.cell_ids):
        out["reader"] = reader_metrics(answers_model, corpus, "test", sub)
    if stage2 is not None:
        labels = {t: str(lab) for t, lab in zip(sub.types, sub.labels)}
        out["text_to_cell"] = text_to_cell_metrics(stage2, corpus.fact_arrays(), sub.programs,
                                                   dict(sorted(labels.items())), seed)
    return _no_nan(out)


def _no_nan(obj: Any) -> Any:
    """NaN (a figure with nothing to measure, e.g. no type with enough cells) becomes None (JSON null)."""
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
