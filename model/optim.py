"""The weight-decay rule, in one place: AdamW decays matrices only.

Biases, norm weights and scalars (``ndim < 2``) are never decayed, nor parameters whose name contains one of
``keep``: the contrastive temperature, or an LLM's embeddings and head, whose untouched rows must stay exactly
where they are (AdamW's moments stay zero there, so decay would be their only motion).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["decay_groups"]


def decay_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 keep: tuple[str, ...] = (), lr: float | None = None) -> list[dict]:
    """The trainable parameters in two AdamW groups, ``[decayed, not decayed]`` (empty groups kept, so callers can
    rely on the order); each group gets ``lr`` when given."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name for k in keep) else decay).append(p)
    extra = {} if lr is None else {"lr": lr}
    return [{"params": decay, "weight_decay": weight_decay, **extra},
            {"params": no_decay, "weight_decay": 0.0, **extra}]
