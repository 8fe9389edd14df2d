"""Constrained decoding of cell-type answers: the LLM may only spell a Cell Ontology name, then stop.

A prefix tree over the token ids of every allowed name (label or synonym, each followed by eos) gives, for the
tokens generated so far, the tokens that may come next. Plugged into HF `generate` through
`prefix_allowed_tokens_fn`, greedy or beam search always ends in a valid name, which `lookup` maps back to its
CL ID.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from scmm.data_pipeline.ontology import Ontology, get_ontology, normalise_label
from scmm.errors import ScmmError
from scmm.model.sequences import encode_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["LabelTrie", "cell_ontology_trie", "cell_ontology_names"]



class LabelTrie:
    """Prefix tree over the token ids of names (+ eos), and name -> CL ID lookup.

    `labels` maps a CL ID to its names, the label first, then synonyms. Names shared by several IDs stay in the
    tree; `lookup` prefers an ID whose *label* is the name over one for which it is a synonym, else the first.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, labels: dict[str, list[str]]):
        if tokenizer.eos_token_id is None:
            raise ScmmError("the tokenizer has no eos token")
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.root: dict[int, dict] = {}
        self._by_label: dict[str, str] = {}
        self._by_synonym: dict[str, str] = {}
        entries = [(term_id, i, " ".join(name.split())) for term_id, names in labels.items()
                   for i, name in enumerate(names) if name and name.strip()]
        if not entries:
            raise ScmmError("LabelTrie needs at least one non-empty name")
        unique = list(dict.fromkeys(name for _, _, name in entries))
        encoded = dict(zip(unique, _encode_many(tokenizer, unique)))  # one batched call: fast for thousands
        self.n_names = 0
        for term_id, i, name in entries:
            node = self.root
            for tok in [*encoded[name], self.eos_id]:
                node = node.setdefault(tok, {})
            self.n_names += 1
            index = self._by_label if i == 0 else self._by_synonym
            index.setdefault(normalise_label(name), term_id)

    def allowed(self, prefix_ids: Sequence[int]) -> list[int]:
        """Sorted token ids that may follow the generated `prefix_ids`; [eos] once a name is complete or the
        prefix left the tree (so generation stops instead of running on unconstrained)."""
        node = self.root
        for tok in prefix_ids:
            node = node.get(int(tok))
            if node is None:
                return [self.eos_id]
        return sorted(node) if node else [self.eos_id]

    def prefix_allowed_tokens_fn(self, prompt_len: int) -> Callable[[int, torch.Tensor], list[int]]:
        """A function for `generate(prefix_allowed_tokens_fn=...)`: skips the first `prompt_len` ids of each row.

        `prompt_len` is the width of the (padded) `input_ids` given to `generate`. When generating from
        `inputs_embeds` alone, HF passes only the generated ids: the first call then sees fewer than `prompt_len`
        ids, and this function reads every id as generated from then on (pass `prompt_len=0` to say so
        explicitly). Make one function per `generate` call.
        """
        state = {"embeds": prompt_len == 0}

        def fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            ids = input_ids.tolist()
            if not state["embeds"] and len(ids) < prompt_len:
                state["embeds"] = True
            return self.allowed(ids if state["embeds"] else ids[prompt_len:])

        return fn

    def lookup(self, text: str) -> str | None:
        """CL ID of a generated answer: exact label, else synonym, after normalisation (case, punctuation,
        `CD14+` = `CD14-positive`, plurals, trailing full stop); None if it names nothing known."""
        if not isinstance(text, str):
            return None
        key = normalise_label(text.strip())
        keys = [key, key[:-1]] if re.search(r"[^s]s$", key) else [key]
        for k in keys:
            for index in (self._by_label, self._by_synonym):
                if k in index:
                    return index[k]
        return None


def _encode_many(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode_text` of many texts in one call of the (fast) tokenizer; falls back to one by one."""
    try:
        batch = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if len(batch) == len(texts):
            return [list(ids) for ids in batch]
    except Exception:
        pass
    return [encode_text(tokenizer, t) for t in texts]


def cell_ontology_names(ontology: Ontology | None = None, include_synonyms: bool = True) -> dict[str, list[str]]:
    """CL ID -> [label, synonyms...] over the non-deprecated Cell Ontology terms."""
    ontology = ontology or get_ontology()
    terms = ontology._parser.cxg_schema.ontology("CL")  # the bundled CL, read once and cached by the guide
    out: dict[str, list[str]] = {}
    for term_id, meta in terms.items():
        if meta.get("deprecated", False) or not term_id.startswith("CL:"):
            continue
        names = [str(meta["label"])]
        if include_synonyms:
            names += [s for s in meta.get("synonyms", []) if s not in names]
        out[term_id] = names
    return out


def cell_ontology_trie(tokenizer: PreTrainedTokenizerBase, ontology: Ontology | None = None,
                       include_synonyms: bool = True) -> LabelTrie:
    """A LabelTrie over every non-deprecated Cell Ontology term (labels and, by default, synonyms)."""
    return LabelTrie(tokenizer, cell_ontology_names(ontology, include_synonyms))
