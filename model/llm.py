"""The language-model side of stage 2: loading a causal LM, cell tokens, LoRA, and a small Llama for demos.

A cell enters the LLM as a block of special tokens ``<cell> <cell_0> .. <cell_{n-1}> </cell>``; the slot tokens'
input embeddings are replaced by the projected Q-Former outputs (soft tokens) in the stage-2 model. Only the rows
of these new tokens are trained in the input embedding and the output head; the rest of the vocabulary is frozen,
so a pretrained LLM keeps its text knowledge (LoRA adapts the attention layers).

`train_tokenizer` + `build_llama` give a from-scratch tiny Llama for offline demos and tests (see
`finetune/init_lm.py`); a real LLM (e.g. a Llama-family checkpoint folder) is loaded the same way by `load_lm`.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm
import torch
from torch import nn

from scmm.errors import ScmmError
from scmm.model.optim import decay_groups

# transformers is imported where it is used: its model classes take seconds to import, and inference with a
# stage-1 model never builds an LLM
if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CELL_START", "CELL_END", "slot_token", "CellTokens", "load_lm", "add_cell_tokens", "LoraOptions",
           "apply_lora", "save_adapter", "optimizer_param_groups", "LlamaSize", "build_llama", "train_tokenizer",
           "check_tokenizer", "SAMPLE_SENTENCE"]


CELL_START = "<cell>"
CELL_END = "</cell>"
SAMPLE_SENTENCE = "A CD14-positive monocyte from the blood of a healthy donor; 10x 3' v3, 1,024 genes."


def slot_token(i: int) -> str:
    """The i-th cell slot token, whose input embedding is replaced by a soft token."""
    return f"<cell_{i}>"


@dataclass
class CellTokens:
    """Token ids of the cell block."""

    start_id: int
    end_id: int
    slot_ids: list[int]

    @property
    def all_ids(self) -> list[int]:
        """Every cell token id: start, end, slots (the rows `apply_lora` makes trainable)."""
        return [self.start_id, self.end_id, *self.slot_ids]


# --- loading ----------------------------------------------------------------------------------------------
def check_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str | Path, text: str = SAMPLE_SENTENCE) -> None:
    """Raise ScmmError unless `text` encodes to some ids and decodes back (modulo whitespace).

    Guards against silently broken tokenizers (e.g. `LlamaTokenizer(vocab_file=...)` in transformers 5
    builds an empty one that encodes everything to nothing or to unknowns).
    """
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
        back = tokenizer.decode(ids, skip_special_tokens=True)
    except Exception as exc:
        raise ScmmError(f"tokenizer in {where} is broken ({type(exc).__name__}: {exc})") from None
    if not ids or " ".join(back.split()) != " ".join(text.split()):
        raise ScmmError(f"tokenizer in {where} is broken: {text!r} encodes to {len(ids)} ids that decode "
                        f"to {back!r}")


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, LlamaTokenizer  # noqa: PLC0415 - transformers' LLM classes take seconds to import (module note)
    hf_files = ("tokenizer_config.json", "tokenizer.json")
    try:
        if any((path / f).is_file() for f in hf_files):
            return AutoTokenizer.from_pretrained(str(path))
        if (path / "tokenizer.model").is_file():
            return LlamaTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ScmmError(f"cannot load the tokenizer in {path} ({type(exc).__name__}: {exc})") from None
    raise ScmmError(f"{path} has no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model)")


def load_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local folder (no network), the tokenizer checked by a round trip.

    A missing pad token is set (to `<pad>` if the vocabulary has it, else unk, else eos); the model config's
    pad_token_id follows it.
    """
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - transformers' LLM classes take seconds to import (module note)
    path = Path(path)
    if not path.is_dir():
        raise ScmmError(f"language model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ScmmError(f"{path} is not a language model folder (no config.json)")
    tokenizer = _load_tokenizer(path)
    check_tokenizer(tokenizer, path)
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = "<pad>" if "<pad>" in vocab else (tokenizer.unk_token or tokenizer.eos_token)
        if pad is None:
            raise ScmmError(f"tokenizer in {path} has no pad, unk or eos token")
        tokenizer.pad_token = pad
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:
        raise ScmmError(f"cannot load the language model in {path} ({type(exc).__name__}: {exc})") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ScmmError(f"tokenizer in {path} has {len(tokenizer)} tokens but the model only "
                        f"{model.get_input_embeddings().weight.shape[0]} embeddings")
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- cell tokens ------------------------------------------------------------------------------------------
def add_cell_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, n_slots: int) -> CellTokens:
    """Add `<cell>`, `</cell>`, `<cell_0>`..`<cell_{n-1}>` as special tokens and return their ids.

    Idempotent: tokens already present keep their ids and embeddings. Embeddings grow when the vocabulary
    outgrows them; rows of newly added tokens (input embedding and output head) start at the mean of the
    rows that existed before, a deterministic init that keeps the new tokens' logits ordinary.
    """
    from transformers import AddedToken  # noqa: PLC0415 - transformers' LLM classes take seconds to import (module note)
    if n_slots < 1:
        raise ScmmError(f"n_slots must be >= 1, got {n_slots}")
    names = [CELL_START, CELL_END, *(slot_token(i) for i in range(n_slots))]
    vocab = tokenizer.get_vocab()
    missing = [n for n in names if n not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(n, special=True, normalized=False, single_word=False, lstrip=False,
                                         rstrip=False) for n in missing], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    unk = tokenizer.unk_token_id
    if any(i is None or (unk is not None and i == unk) for i in ids):
        raise ScmmError("could not add the cell tokens to the tokenizer")
    new_ids = [i for n, i in zip(names, ids) if n in missing]
    emb = model.get_input_embeddings()
    n_old = emb.weight.shape[0]
    if len(tokenizer) > n_old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if new_ids:
        with torch.no_grad():
            weights = [model.get_input_embeddings().weight]
            head = model.get_output_embeddings()
            if head is not None and head.weight is not weights[0]:
                weights.append(head.weight)
            reference = min(n_old, min(new_ids))  # rows before the first new token all existed before
            for w in weights:
                w[new_ids] = w[:reference].mean(0, keepdim=True).to(w.dtype)
            if head is not None and getattr(head, "bias", None) is not None:
                head.bias[new_ids] = head.bias[:reference].mean()
    return CellTokens(start_id=ids[0], end_id=ids[1], slot_ids=list(ids[2:]))


# --- LoRA -------------------------------------------------------------------------------------------------
@dataclass
class LoraOptions:
    """LoRA settings; `full_finetune` trains every transformer weight instead (new token rows still only)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    full_finetune: bool = False


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ScmmError(f"module {type(module).__name__} not found in the model")


def _mask_rows_grad(weight: nn.Parameter, rows: list[int]) -> None:
    """Zero the gradient of every row of `weight` except `rows` (a hook: the mask applies on every backward)."""
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.register_hook(lambda grad: grad * mask.to(grad.dtype))


def apply_lora(model: PreTrainedModel, options: LoraOptions, new_token_ids: list[int]) -> nn.Module:
    """Make the model trainable for stage 2: LoRA on `options.target_modules`, plus only the rows of
    `new_token_ids` in the input embedding and the output head.

    LoRA path: peft's own `trainable_token_indices` (a `TrainableTokensWrapper` around the embedding and the
    head holding just those rows; tied heads follow the embedding). `save_pretrained` writes adapter + rows,
    `PeftModel.from_pretrained` on the same base (after `add_cell_tokens`) reloads them exactly.

    Full fine-tune path: every parameter trains, the embedding and head through a gradient mask that zeroes the
    other rows. AdamW's moments stay zero there, so those rows only move by weight decay: build the optimizer with
    :func:`optimizer_param_groups` (no decay on embeddings and head) to keep them exactly frozen.
    """
    if not new_token_ids:
        raise ScmmError("apply_lora needs the ids of the new tokens")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    if options.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        _mask_rows_grad(emb.weight, new_token_ids)
        if head is not None and not tied:
            _mask_rows_grad(head.weight, new_token_ids)
        return model
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - peft imports transformers: seconds
    indices = {_module_name(model, emb): list(new_token_ids)}
    if head is not None and not tied:
        indices[_module_name(model, head)] = list(new_token_ids)
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules), trainable_token_indices=indices,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module the model does not have
        raise ScmmError(f"cannot apply LoRA: {exc}") from None


def save_adapter(model: nn.Module, folder: str | Path) -> None:
    """Save a model from :func:`apply_lora` (LoRA path): the adapter and just the new token rows.

    peft would otherwise store the whole resized embedding and head (it sees the vocabulary grew). Reload with
    `load_lm(base)`, `add_cell_tokens(tokenizer, base, n)` (same n), then `PeftModel.from_pretrained(base, folder)`:
    the new rows' base values are the deterministic mean init, so the reload is exact.
    """
    model.save_pretrained(str(folder), save_embedding_layers=False)


#: parameter names an LLM never decays: its embeddings and head (new cell-token rows train, the rest must not move)
LM_NO_DECAY = ("embed_tokens", "lm_head", "wte", "token_adapter", "trainable_tokens")


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: decay for matrices, none for biases, norms, embeddings, head."""
    return decay_groups(model.named_parameters(), weight_decay, keep=LM_NO_DECAY)


# --- a small Llama from scratch ---------------------------------------------------------------------------
@dataclass
class LlamaSize:
    """Shape of a from-scratch Llama (defaults: the CPU demo size, about 5M parameters without embeddings)."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def build_llama(cfg: LlamaSize, vocab_size: int, *, bos_token_id: int = 1, eos_token_id: int = 2,
                pad_token_id: int | None = 3) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM (untied head), special ids matching `train_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - transformers' LLM classes take seconds to import (module note)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         max_position_embeddings=cfg.max_position_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a sentencepiece BPE tokenizer on `texts` and save it in `out_dir` (tokenizer.model + HF files).

    byte_fallback makes any text encodable; identity normalisation (no NFKC, whitespace kept) makes decode
    give the text back. Ids: unk 0, bos 1, eos 2, pad 3. `vocab_size` is an upper bound on small corpora.
    Returns the tokenizer as `load_lm` loads it (LlamaTokenizer), already round-trip checked.
    """
    from transformers import LlamaTokenizer  # noqa: PLC0415 - transformers' LLM classes take seconds to import (module note)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "texts.txt"
        n = 0
        with corpus.open("w", encoding="utf-8") as f:
            for t in texts:
                line = " ".join(str(t).split())
                if line:
                    f.write(line + "\n")
                    n += 1
        if n == 0:
            raise ScmmError("no texts to train the tokenizer on")
        prefix = Path(tmp) / "sp"
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, character_coverage=1.0, split_digits=True, hard_vocab_limit=False,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                pad_piece="<pad>", max_sentence_length=1 << 16, num_threads=2, minloglevel=2,
                allow_whitespace_only_pieces=True)
        except RuntimeError as exc:
            raise ScmmError(f"sentencepiece training failed: {exc}") from None
        (out_dir / "tokenizer.model").write_bytes(prefix.with_suffix(".model").read_bytes())
    tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=True)  # Llama's convention
    tokenizer.pad_token = "<pad>"
    check_tokenizer(tokenizer, out_dir)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
