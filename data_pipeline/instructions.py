"""Instruction data for stage 2: one (prompt, answer) row per (cell, task) of a corpus split.

Tasks: ``describe`` (answer: the cell's corpus description), ``cell_type`` (answer: the Cell Ontology label of the
cell's CL ID, else the corpus label) and ``tissue`` (answer: the tissue label; cells without one get no tissue row);
on a corpus with per-cell facts (:mod:`scmm.data_pipeline.facts`) also ``programs`` (answer: the cell's three most
active hallmark programs) and ``markers`` (answer: its first three marker genes with their names), phrased as the
caption's cell-specific sentence (:func:`scmm.data_pipeline.fact_text.fact_sentence`); a corpus without facts gives
no rows for them. With ``describe_facts=False`` the describe answer is the caption without that sentence (the
label sentences alone).
Each task has several prompt phrasings; a row's phrasing is a stable hash of (seed, cell ID, task), so datasets are
reproducible across processes and the model does not overfit one wording.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from scmm.data_pipeline.fact_text import N_CAPTION_MARKERS, N_CAPTION_PROGRAMS, fact_sentence, fact_template_index
from scmm.data_pipeline.facts import gene_names
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus
from scmm.errors import ScmmError

if TYPE_CHECKING:
    import datasets

__all__ = ["TASKS", "PROMPTS", "UNSEEN_PROMPTS", "prompt_for", "template_for", "instruction_dataset"]

TASKS = ("describe", "cell_type", "tissue", "programs", "markers")
FACT_TASKS = ("programs", "markers")

PROMPTS: dict[str, tuple[str, ...]] = {
    "describe": (
        "Describe this cell.",
        "What can you tell me about this cell?",
        "Write a short description of this single-cell transcriptome.",
        "Summarise what this cell is and where it comes from.",
    ),
    "cell_type": (
        "What is the cell type of this cell?",
        "Which cell type is this?",
        "Name the cell type of this cell.",
        "Annotate this cell with its Cell Ontology cell type.",
    ),
    "tissue": (
        "Which tissue does this cell come from?",
        "What tissue was this cell sampled from?",
        "Name the tissue of origin of this cell.",
    ),
    "programs": (
        "Which programs are active in this cell?",
        "Which hallmark programs are most active in this cell?",
        "What gene programs does this cell show?",
    ),
    "markers": (
        "Which genes does it express highly?",
        "Which genes are most over-expressed in this cell?",
        "Name the marker genes of this cell.",
    ),
}

# phrasings that training never uses: the evaluation asks them to measure whether the LLM understands the question
# or only recognises a template (generation.type_accuracy_unseen_phrasing)
UNSEEN_PROMPTS: dict[str, tuple[str, ...]] = {
    "cell_type": (
        "Identify the kind of cell shown here.",
        "Tell me what sort of cell this is.",
        "This transcriptome comes from which type of cell?",
    ),
}

_MISSING = frozenset({"", "unknown", "na", "nan", "none"})
_COLUMNS = ("cell_id", "text", "cell_type", "cell_type_ontology_term_id", "tissue", "tissue_ontology_term_id")


def prompt_for(task: str, template: int = 0) -> str:
    """The prompt of `task` in phrasing `template` (for inference; training uses every phrasing)."""
    if task not in PROMPTS:
        raise ScmmError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    templates = PROMPTS[task]
    if not 0 <= template < len(templates):
        raise ScmmError(f"task {task!r} has prompt templates 0..{len(templates) - 1}, not {template}")
    return templates[template]


def template_for(seed: int, cell_id: str, task: str) -> int:
    """Index of the phrasing of one row: a stable hash of (seed, cell ID, task)."""
    digest = hashlib.sha256(f"{seed}\x1f{cell_id}\x1f{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % len(PROMPTS[task])


def _clean(value: object) -> str | None:
    text = " ".join(str(value).split()) if value is not None else ""
    return None if text.lower() in _MISSING else text


def _without(text: str, sentence: str) -> str:
    """``text`` without the caption's cell-specific ``sentence`` (it follows the first sentence: see
    :func:`scmm.data_pipeline.text.describe`)."""
    if not sentence:
        return text
    if sentence not in text:
        raise ScmmError(f"a caption does not hold its cell-specific sentence {sentence!r} (was the corpus built by "
                        "another version?); set data.describe_facts: true")
    return " ".join(text.replace(sentence, "", 1).split())


def instruction_dataset(corpus: Corpus, split: str, tasks: Sequence[str] = TASKS, seed: int = 0,
                        describe_facts: bool = True) -> datasets.Dataset:
    """Rows (cell_id, task, prompt, answer, cell_type_ontology_term_id), cell by cell in corpus order, tasks in
    the order given; ``describe_facts=False``: describe answers without the cell-specific sentence."""
    import datasets  # noqa: PLC0415 - it costs about a second, and the prompts alone (inference) do not need it

    unknown = [t for t in tasks if t not in PROMPTS]
    if unknown or not tasks:
        raise ScmmError(f"unknown task(s) {', '.join(unknown) or '(none given)'} (tasks: {', '.join(TASKS)})")
    ontology = get_ontology()
    label_cache: dict[str, str | None] = {}

    def term_label(term_id: str | None) -> str | None:
        if term_id is None:
            return None
        if term_id not in label_cache:
            label_cache[term_id] = ontology.label(term_id) if ontology.is_valid(term_id) else None
        return label_cache[term_id]

    strip = not describe_facts and "describe" in tasks
    facts = corpus.facts if strip or any(t in FACT_TASKS for t in tasks) else None
    symbols = corpus.gene_symbols if facts is not None else None
    names = gene_names(symbols) if facts is not None else {}
    rows: dict[str, list[str]] = {k: [] for k in ("cell_id", "task", "prompt", "answer", "cell_type_ontology_term_id")}
    for entry in corpus.shards(split):
        columns = tuple(c for c in _COLUMNS if c in entry["columns"])
        obs = corpus.read_shard(entry["name"], columns).obs
        n = entry["n_cells"]
        scores, markers = corpus.read_facts(entry["name"]) if facts is not None else (None, None)
        for i in range(n):
            def get(name: str, i: int = i, obs: dict = obs) -> str | None:
                return _clean(obs[name][i]) if name in obs else None

            cell_id = get("cell_id") or f"{entry['name']}:{i}"
            cl_id = get("cell_type_ontology_term_id")
            answers = {
                "describe": get("text"),
                "cell_type": term_label(cl_id) or get("cell_type"),
                "tissue": get("tissue") or term_label(get("tissue_ontology_term_id")),
                "programs": None, "markers": None,
            }
            if facts is not None:
                phrasing = fact_template_index(cell_id)
                top = np.argsort(-scores[i], kind="stable")[:N_CAPTION_PROGRAMS]
                answers["programs"] = fact_sentence([facts["programs"]["names"][p] for p in top], [],
                                                    phrasing) or None
                genes = [(str(symbols[g]), names.get(str(symbols[g]))) for g in markers[i][:N_CAPTION_MARKERS]
                         if g >= 0]
                answers["markers"] = fact_sentence([], genes, phrasing) or None
                if strip and answers["describe"] is not None:
                    answers["describe"] = _without(answers["describe"], fact_sentence(
                        [facts["programs"]["names"][p] for p in top], genes, phrasing))
            for task in tasks:
                answer = answers[task]
                if answer is None:
                    continue
                rows["cell_id"].append(cell_id)
                rows["task"].append(task)
                rows["prompt"].append(PROMPTS[task][template_for(seed, cell_id, task)])
                rows["answer"].append(answer)
                rows["cell_type_ontology_term_id"].append(cl_id or "")
    features = datasets.Features({k: datasets.Value("string") for k in rows})
    return datasets.Dataset.from_dict(rows, features=features)
