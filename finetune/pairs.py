"""Stage-2 training pairs: each loader batch of cells becomes instructions, descriptions and target profiles.

Each training cell is paired with one instruction (task and template chosen deterministically from the seed, the
step, the rank and the cell's place in the batch) and with its own description for the text -> cell path; its
target profile is its log1p-CP10k expression over the gene panel (the training split's highly variable genes).
:meth:`PairBuilder.program_scores` gives the cells' program scores (the program reader's targets); with
``bridge.programs``/``bridge.markers`` each prompt starts with the cell's context (``PairBuilder.contexts``, set from
the fitted readers, as :meth:`scmm.model.stage2.Stage2Model.cell_prompts` does at inference).
On a corpus with per-cell facts the text -> cell input is, by the same deterministic draw, the description or one
of two short texts: "<type> with high <its most active program> activity" and "<type> with low <its least active
program> activity" (:func:`scmm.data_pipeline.fact_text.type_program_query`), so that pseudo-cells can be asked for
by program.
"""
from __future__ import annotations

import numpy as np
import torch

from scmm.data_pipeline.fact_text import type_program_query
from scmm.data_pipeline.hvg import hvg_panel, log1p_profiles
from scmm.data_pipeline.instructions import instruction_dataset
from scmm.data_pipeline.store import Corpus
from scmm.errors import ScmmError
from scmm.model.sequences import SequenceBuilder
from scmm.model.stage2 import with_context

__all__ = ["PairBuilder", "hvg_info"]


def hvg_info(corpus: Corpus, n_top: int) -> dict:
    """The gene panel: sorted corpus gene indices of the training split's HVGs, with symbols and vocab ids."""
    idx = hvg_panel(corpus, n_top=n_top, split="train")
    return {"indices": idx.tolist(), "symbols": [str(s) for s in corpus.gene_symbols[idx]],
            "vocab_ids": [int(i) for i in corpus.gene_vocab_ids[idx]]}


class PairBuilder:
    """Loader batches -> stage-2 batches: an instruction per cell, its description, its target HVG profile."""

    def __init__(self, corpus: Corpus, split: str, tasks: list[str], seed: int, genes: np.ndarray,
                 builder: SequenceBuilder, task_weights: list[float] | None = None, describe_facts: bool = True):
        weight = dict(zip(tasks, task_weights)) if task_weights else {t: 1.0 for t in tasks}
        ds = instruction_dataset(corpus, split, tasks, seed, describe_facts=describe_facts)
        self.rows: dict[str, list[tuple[str, str, float]]] = {}
        for cid, task, prompt, answer in zip(ds["cell_id"], ds["task"], ds["prompt"], ds["answer"]):
            if weight[task] > 0:
                self.rows.setdefault(str(cid), []).append((prompt, answer, weight[task]))
        x, ids, _ = log1p_profiles(corpus, split, genes)
        self.profiles = {c: i for i, c in enumerate(ids)}
        self.x = torch.from_numpy(x)
        # each profile's description (the text -> cell input), as an index into the distinct descriptions
        pool: dict[str, int] = {}
        text_of: dict[str, int] = {}
        queries: dict[str, tuple[int, int]] = {}  # cell -> (high query, low query) indices into the pool
        program_rows: dict[str, np.ndarray] = {}
        facts = corpus.facts
        for entry in corpus.shards(split):
            shard = corpus.read_shard(entry["name"], ("cell_id", "text", "cell_type"))
            scores = corpus.read_facts(entry["name"])[0] if facts is not None else None
            for i, (c, t) in enumerate(zip(shard.obs["cell_id"], shard.obs["text"])):
                text_of[str(c)] = pool.setdefault(str(t), len(pool))
                if scores is not None and scores.shape[1]:
                    program_rows[str(c)] = scores[i]
                    order = np.argsort(-scores[i], kind="stable")
                    label, names = str(shard.obs["cell_type"][i]), facts["programs"]["names"]
                    queries[str(c)] = (pool.setdefault(type_program_query(label, names[order[0]], True), len(pool)),
                                       pool.setdefault(type_program_query(label, names[order[-1]], False),
                                                       len(pool)))
        self.programs = None  # each profile's program scores (the program reader's target)
        if program_rows:
            self.programs = torch.from_numpy(np.stack([program_rows[c] for c in ids]).astype(np.float32))
        self.text_pool = list(pool)
        self.text_index = torch.tensor([text_of[c] for c in ids], dtype=torch.long)
        self.query_index = torch.tensor([queries[c] for c in ids], dtype=torch.long) if queries else None
        self.seed, self.builder = seed, builder
        self.contexts: dict[str, str] = {}  # cell ID -> what its prompts are told first (bridge.programs/markers)

    def program_scores(self, cell_ids) -> torch.Tensor:
        """``[n, P]``: the corpus's program scores of these cells (the program reader's targets)."""
        if self.programs is None:
            raise ScmmError("the corpus has no per-cell facts")
        return self.programs[[self.profiles[str(c)] for c in cell_ids]]

    def refit_data(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(texts, text index per profile, profiles) for the decoder refit: each profile with its description and,
        on a corpus with facts, again with its high- and low-program queries."""
        if self.query_index is None:
            return self.text_pool, self.text_index, self.x
        index = torch.cat([self.text_index, self.query_index[:, 0], self.query_index[:, 1]])
        return self.text_pool, index, self.x.repeat(3, 1)

    def _t2c_text(self, cid: str, text: str, step: int, rank: int, i: int) -> str:
        if self.query_index is None:
            return text
        pick = np.random.default_rng([self.seed, step, rank, i, 1]).integers(3)
        if pick == 0:
            return text
        return self.text_pool[int(self.query_index[self.profiles[cid], pick - 1])]

    def __call__(self, batch: dict, step: int, rank: int) -> dict:
        c2t, texts, rows, index = [], {}, [], []
        for i, (cid, text) in enumerate(zip(batch["cell_id"], batch["text"])):
            options = self.rows.get(str(cid))
            if not options:
                raise ScmmError(f"cell {cid} has no instruction")
            p = np.array([w for _, _, w in options])
            pick = np.random.default_rng([self.seed, step, rank, i]).choice(len(options), p=p / p.sum())
            prompt, answer, _ = options[pick]
            c2t.append(self.builder.cell_to_text(with_context(self.contexts.get(str(cid), ""), prompt), answer))
            t2c = self._t2c_text(str(cid), str(text), step, rank, i)
            index.append(texts.setdefault(t2c, len(texts)))  # each distinct text runs once
            rows.append(self.profiles[str(cid)])
        out = {k: batch[k] for k in ("gene_ids", "values", "padding_mask")}
        out["c2t"] = self.builder.collate(c2t, padding_side="right")
        out["t2c"] = self.builder.collate([self.builder.text_to_cell(t) for t in texts], padding_side="right")
        out["t2c_index"] = torch.tensor(index, dtype=torch.long)
        out["hvg"] = self.x[rows]
        return out
