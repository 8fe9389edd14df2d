"""Token sequences for stage 2: cell -> text (description / annotation answers) and text -> cell.

Plain layout (base models, and tokenizers without a chat template)::

    cell -> text:  <bos> <cell> <cell_0> .. <cell_{n-1}> </cell> {prompt} {answer} <eos>
                   labels: -100 ............................... -100  answer    eos
    text -> cell:  <bos> {description} <cell> <cell_0> .. <cell_{n-1}> </cell>

Chat layout (an instruction-tuned model, prompted the way it was trained: its tokenizer's chat template)::

    cell -> text:  {template up to the user's text} <cell> .. </cell> {prompt} {template: end of the user's turn,
                   the assistant's header} {answer} <eos>            (labels: answer and eos)
    text -> cell:  {template up to the user's text} {description} {end of the user's turn, assistant's header}
                   <cell> .. </cell>

The template is rendered once around a placeholder and split there, so the cell block sits inside the user's
turn and the answer is the assistant's turn; ``eos`` is the tokenizer's (``<|im_end|>`` for ChatML models, which
ends the assistant's turn). Prompt, answer and description are each encoded on their own without special tokens
(:func:`encode_text`), so the answer tokens a model learns are exactly the tokens that
:class:`finetune.constrained.LabelTrie` allows at generation time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scmm.errors import ScmmError
from scmm.model.llm import CellTokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "PROMPT_FORMATS", "SequenceBuilder", "encode_text"]

IGNORE_INDEX = -100
PROMPT_FORMATS = ("auto", "chat", "plain")  # auto: chat when the tokenizer has a chat template
_MARK = "\ue000"  # a private-use character: where the cell block or the description goes in the template


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one piece of text, no special tokens (the one encoding used for prompts, answers, labels)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


class SequenceBuilder:
    """Builds the stage-2 sequences of one tokenizer and cell block; `max_length` bounds every sequence;
    ``prompt_format`` picks the layout (module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cell_tokens: CellTokens, max_length: int,
                 prompt_format: str = "auto"):
        if prompt_format not in PROMPT_FORMATS:
            raise ScmmError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, not {prompt_format!r}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format == "chat" and not has_template:
            raise ScmmError("prompt_format chat: the tokenizer has no chat template")
        self.chat = has_template and prompt_format != "plain"
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
        if self.chat:
            self.user_before, self.user_after = self._chat_around(_MARK)
        if max_length < len(self.bos) + len(self.cell_block) + 1:
            raise ScmmError(f"max_length {max_length} leaves no room beside the {len(self.cell_block)}-token "
                            f"cell block")

    @property
    def n_slots(self) -> int:
        return len(self.cell_tokens.slot_ids)

    def _chat_around(self, user: str) -> tuple[list[int], list[int]]:
        """Token ids of a one-turn chat before and after the placeholder in the user's message ``user``, the
        assistant's header included (special tokens in the rendered text are read as the special tokens)."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True)
        if text.count(_MARK) != 1:
            raise ScmmError("the tokenizer's chat template does not show the user's message as it is")
        before, after = text.split(_MARK)
        return encode_text(self.tokenizer, before), encode_text(self.tokenizer, after)

    def _prompt_head(self, prompt: str) -> tuple[list[int], int]:
        """Tokens up to where the answer starts, and the position of the first cell slot."""
        if not self.chat:
            return [*self.bos, *self.cell_block, *encode_text(self.tokenizer, prompt)], len(self.bos) + 1
        before, after = self._chat_around(_MARK + prompt)
        return [*before, *self.cell_block, *after], len(before) + 1

    def cell_to_text(self, prompt: str, answer: str | None) -> dict:
        """Cell block, prompt, then answer + eos (the only supervised tokens); `answer=None` is the generation prompt.

        Too long: the answer (with its eos) is cut from the end; a prompt that leaves no room for at least one
        answer token (or, with `answer=None`, that does not fit) is an error.
        """
        head, start = self._prompt_head(prompt)
        room = self.max_length - len(head)
        if room < (0 if answer is None else 1):
            raise ScmmError(f"prompt too long: {len(head)} tokens with the cell block, max_length {self.max_length}")
        tail = [] if answer is None else [*encode_text(self.tokenizer, answer), self.eos_id][:room]
        input_ids = head + tail
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(head) + tail,
            "slot_positions": list(range(start, start + self.n_slots)),
        }

    def text_to_cell(self, description: str) -> dict:
        """Description then the cell block (whose slot positions' hidden states feed the expression decoder)."""
        before, after = (self.user_before, self.user_after) if self.chat else (self.bos, [])
        room = self.max_length - len(before) - len(after) - len(self.cell_block)
        if room < 1:
            raise ScmmError(f"max_length {self.max_length} leaves no room for a description in the chat template")
        text = encode_text(self.tokenizer, description)[:room]
        input_ids = [*before, *text, *after, *self.cell_block]
        start = len(input_ids) - len(self.cell_block) + 1
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
