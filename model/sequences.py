"""Token sequences for stage 2: cell -> text (description / annotation answers) and text -> cell.

cell -> text::

    <bos> <cell> <cell_0> .. <cell_{n-1}> </cell> {prompt} {answer} <eos>
    labels: -100 ............................... -100  answer    eos

text -> cell::

    <bos> {description} <cell> <cell_0> .. <cell_{n-1}> </cell>

Prompt, answer and description are each encoded on their own without special tokens (:func:`encode_text`),
so the answer tokens a model learns are exactly the tokens that :class:`finetune.constrained.LabelTrie`
allows at generation time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scmm.errors import ScmmError
from scmm.model.llm import CellTokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "SequenceBuilder", "encode_text"]

IGNORE_INDEX = -100


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one piece of text, no special tokens (the one encoding used for prompts, answers, labels)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


class SequenceBuilder:
    """Builds the stage-2 sequences of one tokenizer and cell block; `max_length` bounds every sequence."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cell_tokens: CellTokens, max_length: int):
        if tokenizer.eos_token_id is None:
            raise ScmmError("the tokenizer has no eos token")
        if tokenizer.pad_token_id is None:
            raise ScmmError("the tokenizer has no pad token (load it with model.llm.load_lm)")
        self.tokenizer = tokenizer
        self.cell_tokens = cell_tokens
        self.max_length = max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.cell_block = [cell_tokens.start_id, *cell_tokens.slot_ids, cell_tokens.end_id]
        if max_length < len(self.bos) + len(self.cell_block) + 1:
            raise ScmmError(f"max_length {max_length} leaves no room beside the {len(self.cell_block)}-token "
                            f"cell block")

    @property
    def n_slots(self) -> int:
        return len(self.cell_tokens.slot_ids)

    def cell_to_text(self, prompt: str, answer: str | None) -> dict:
        """Cell block, prompt, then answer + eos (the only supervised tokens); `answer=None` is the generation prompt.

        Too long: the answer (with its eos) is cut from the end; a prompt that leaves no room for at least one
        answer token (or, with `answer=None`, that does not fit) is an error.
        """
        head = [*self.bos, *self.cell_block, *encode_text(self.tokenizer, prompt)]
        room = self.max_length - len(head)
        if room < (0 if answer is None else 1):
            raise ScmmError(f"prompt too long: {len(head)} tokens with the cell block, max_length {self.max_length}")
        tail = [] if answer is None else [*encode_text(self.tokenizer, answer), self.eos_id][:room]
        input_ids = head + tail
        start = len(self.bos) + 1
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(head) + tail,
            "slot_positions": list(range(start, start + self.n_slots)),
        }

    def text_to_cell(self, description: str) -> dict:
        """Description then the cell block (whose slot positions' hidden states feed the expression decoder)."""
        room = self.max_length - len(self.bos) - len(self.cell_block)
        text = encode_text(self.tokenizer, description)[:room]
        input_ids = [*self.bos, *text, *self.cell_block]
        start = len(self.bos) + len(text) + 1
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "slot_positions": list(range(start, start + self.n_slots)),
        }

    def collate(self, items: list[dict], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad a batch: input_ids with pad id, attention_mask 0, labels -100 (items without labels: all -100,
        and no `labels` key when no item has them); `slot_positions` [B, n] shifted by the left padding."""
        if padding_side not in ("left", "right"):
            raise ScmmError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not items:
            raise ScmmError("cannot collate an empty batch")
        width = max(len(it["input_ids"]) for it in items)
        has_labels = any("labels" in it for it in items)
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "slot_positions": []}
        for it in items:
            n = len(it["input_ids"])
            pad = width - n
            labels = it.get("labels", [IGNORE_INDEX] * n)

            def padded(seq: list[int], value: int, pad: int = pad) -> list[int]:
                return [value] * pad + list(seq) if padding_side == "left" else list(seq) + [value] * pad

            out["input_ids"].append(padded(it["input_ids"], self.pad_id))
            out["attention_mask"].append(padded(it["attention_mask"], 0))
            out["labels"].append(padded(labels, IGNORE_INDEX))
            shift = pad if padding_side == "left" else 0
            out["slot_positions"].append([p + shift for p in it["slot_positions"]])
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        if not has_labels:
            del batch["labels"]
        return batch
