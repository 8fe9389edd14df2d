"""The stage-2 bridge between the cell side (Q-Former query states) and the language model.

Three small modules, each one idea:

* :class:`CellProjector`: Q-Former query states ``[B, n, d_q]`` (optionally each joined with the cell tower's
  ``<cls>`` embedding, ``BridgeOptions.cell_embedding``) -> soft tokens in the LLM's embedding space ``[B, n, H]``
  (placed between ``<cell>`` and ``</cell>``; cell -> text).
* :class:`TextToCellHead`: the LLM's hidden states at the cell slot tokens ``[B, n, H]`` -> the Q-Former query
  space ``[B, n, d_q]`` (text -> cell; trained against the paired real cell's query states, stop-gradient).
* :class:`PseudoCellDecoder`: query states ``[B, n, d_q]`` (real or LLM-mapped) -> a pseudo-cell profile over
  a gene panel (the corpus's highly variable genes): the mean log1p-CP10k expression ``[B, G]`` and a per-gene
  log standard deviation ``[B, G]`` that sets the sampling noise. ``sample(states, generator)`` draws profiles
  ``max(0, mean + std * eps)`` (log1p values are never negative).

The losses live here too (:func:`decoder_loss`, :func:`t2c_loss`), so that a trainer only weights them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BridgeOptions:
    """Widths of the bridge MLPs (0: the wider of the two sides) and the losses' details."""

    projector_hidden: int = 0
    t2c_hidden: int = 0
    decoder_hidden: int = 512
    dropout: float = 0.0
    t2c_loss: str = "mse"  # mse | cosine (per slot)
    nll_weight: float = 0.1  # weight of the Gaussian NLL that trains the decoder's log-std (LLM path)
    min_log_std: float = -4.0
    max_log_std: float = 1.5
    standardize: bool = False  # z-score query states with training statistics (QueryNorm); off: identity
    lr_scale: float = 1.0  # learning rate of the bridge modules relative to train.lr (they start from scratch)
    # each soft token also reads the cell tower's <cls> embedding (scGPT's cell embedding) beside its query state
    cell_embedding: bool = False

    def __post_init__(self) -> None:
        if self.t2c_loss not in ("mse", "cosine"):
            raise ValueError(f"bridge.t2c_loss must be mse or cosine, not '{self.t2c_loss}'")
        if min(self.projector_hidden, self.t2c_hidden) < 0 or self.decoder_hidden < 1 or self.lr_scale <= 0:
            raise ValueError("bridge widths must be positive (0 for the automatic width)")


class QueryNorm(nn.Module):
    """Per-slot, per-dimension standardisation of query states with fixed statistics of training cells.

    The bridge works in this z-space: the projector and the decoder read it, the text->cell head predicts it.
    Query states share a large component across cells; removing it leaves the part that tells cells apart.
    """

    def __init__(self, n_queries: int, d_query: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_queries, d_query))
        self.register_buffer("std", torch.ones(n_queries, d_query))

    @torch.no_grad()
    def set_stats(self, states: torch.Tensor) -> None:
        states = states.float()
        self.mean.copy_(states.mean(0).to(self.mean))
        self.std.copy_(states.std(0).clamp_min(1e-3).to(self.std))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.mean.to(states.dtype)) / self.std.to(states.dtype)


def _mlp(d_in: int, d_hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    # the LayerNorm before the GELU keeps half the hidden units active (see PseudoCellDecoder)
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


class CellProjector(nn.Module):
    """``[B, n, d_in]`` cell inputs (query states, optionally joined with the cell embedding) -> ``[B, n, H]`` soft
    tokens; the output is scaled like the LLM's embeddings."""

    def __init__(self, d_query: int, d_llm: int, hidden: int = 0, dropout: float = 0.0, embed_std: float = 0.02):
        super().__init__()
        self.mlp = _mlp(d_query, hidden or max(d_query, d_llm), d_llm, dropout)
        # start at the typical scale of the LLM's token embeddings, so the first steps do not swamp the text
        nn.init.normal_(self.mlp[-1].weight, std=embed_std / max(1.0, (hidden or max(d_query, d_llm)) ** 0.5) * 2)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(query_states)


class TextToCellHead(nn.Module):
    """``[B, n, H]`` LLM hidden states at the slots -> ``[B, n, d_q]`` in the Q-Former query space."""

    def __init__(self, d_llm: int, d_query: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.mlp = _mlp(d_llm, hidden or max(d_query, d_llm), d_query, dropout)

    def forward(self, slot_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(slot_states)


class PseudoCellDecoder(nn.Module):
    """Query states ``[B, n, d_q]`` -> (mean log1p expression ``[B, G]``, log std ``[B, G]``) over the gene panel."""

    def __init__(self, n_queries: int, d_query: int, n_genes: int, hidden: int = 512, dropout: float = 0.0,
                 min_log_std: float = -4.0, max_log_std: float = 1.5):
        super().__init__()
        self.n_queries, self.d_query, self.n_genes = n_queries, d_query, n_genes
        self.min_log_std, self.max_log_std = min_log_std, max_log_std
        self.norm = nn.LayerNorm(d_query)
        # a LayerNorm before each GELU keeps half the units active whatever the inputs' offset: without it a few
        # large steps can push every pre-activation negative, and the decoder then ignores its input for good
        self.body = nn.Sequential(nn.Linear(n_queries * d_query, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.mean_head = nn.Linear(hidden, n_genes)
        self.log_std_head = nn.Linear(hidden, n_genes)
        nn.init.zeros_(self.log_std_head.weight)
        nn.init.zeros_(self.log_std_head.bias)

    @torch.no_grad()
    def init_from_profiles(self, profiles: torch.Tensor) -> None:
        """Start at the panel's mean profile and per-gene spread (e.g. of the training cells)."""
        profiles = profiles.float()
        self.mean_head.bias.copy_(profiles.mean(0).to(self.mean_head.bias))
        std = profiles.std(0).clamp_min(1e-3).log().clamp(self.min_log_std, self.max_log_std)
        self.log_std_head.bias.copy_(std.to(self.log_std_head.bias))

    def forward(self, query_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.norm(query_states).flatten(1))
        log_std = self.log_std_head(h).clamp(self.min_log_std, self.max_log_std)
        return self.mean_head(h), log_std

    @torch.no_grad()
    def sample(self, query_states: torch.Tensor, generator: torch.Generator | None = None,
               noise: float = 1.0) -> torch.Tensor:
        """Pseudo-cell profiles ``[B, G]``: ``max(0, mean + noise * std * eps)``, eps drawn from `generator`."""
        mean, log_std = self(query_states)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        return (mean.float() + noise * log_std.float().exp() * eps).clamp_min(0.0)


def decoder_loss(mean: torch.Tensor, log_std: torch.Tensor | None, target: torch.Tensor,
                 nll_weight: float = 0.0) -> torch.Tensor:
    """MSE of the mean profile, plus (optionally) a Gaussian NLL that fits the log-std around the detached mean."""
    target = target.float()
    loss = F.mse_loss(mean.float(), target)
    if log_std is not None and nll_weight > 0:
        resid2 = (target - mean.detach().float()) ** 2
        ls = log_std.float()
        nll = (0.5 * resid2 * torch.exp(-2 * ls) + ls).mean()
        loss = loss + nll_weight * nll
    return loss


def t2c_loss(mapped: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance of the LLM-mapped slot states to the (detached) query states of the paired real cell."""
    target = target.detach().float()
    mapped = mapped.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(mapped, target, dim=-1)).mean()
    return F.mse_loss(mapped, target)


__all__ = ["BridgeOptions", "QueryNorm", "CellProjector", "TextToCellHead", "PseudoCellDecoder", "decoder_loss",
           "t2c_loss"]
