"""Refit the pseudo-cell decoder on what the finished LLM produces (the last phase of stage 2).

During the joint stage-2 loop the decoder sees each training cell a few times, while the LLM's mapped states
it reads keep moving; it ends under-fit. Once the LLM is final, its mapped state for a description is fixed, so
the decoder can be fitted to those states cheaply: every distinct description runs through the LLM once
(cached), and the decoder alone trains on ``(mapped state of a cell's description, the cell's profile)`` pairs,
with the same loss as ``decode_llm`` (:func:`scmm.model.bridge.decoder_loss`: the zero model's cross-entropy,
the mean's squared error and the Gaussian NLL that sets the sampling noise).

**Decision**: the refit runs on rank 0 after the final checkpoint is consolidated, on the exported model, with
the training engine's in-process back end (no DeepSpeed: the decoder is a small MLP). Measured effect:
BENCHMARKS.md, "Stage 2: the decoder refit". It is a deterministic function of that
model, the training split and the seed, so an interrupted export simply runs it again. Real-cell decoding
(``decode_real``) is not refitted: only the text -> cell path uses the decoder at inference.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from scmm.model.bridge import decoder_loss
from scmm.model.optim import decay_groups
from scmm.pretrain.engine import Trainer, TrainOptions

__all__ = ["RefitOptions", "refit_decoder"]


@dataclass
class RefitOptions:
    """The decoder refit phase: ``steps`` AdamW steps of ``batch_size`` training cells, lr decaying linearly
    from ``lr`` to 0 (``steps: 0`` turns the phase off)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.log_every < 1:
            raise ValueError("refit needs steps >= 0, batch_size >= 1, lr > 0 and log_every >= 1")

    def train_options(self) -> TrainOptions:
        return TrainOptions(steps=self.steps, lr=self.lr, schedule="linear", warmup_steps=0, weight_decay=0.0,
                            grad_clip=0.0, betas=(0.9, 0.999), precision="fp32", log_every=self.log_every)


def refit_decoder(model, texts: Sequence[str], text_index: torch.Tensor, profiles: torch.Tensor, opts: RefitOptions,
                  seed: int, nll_weight: float, log_path: Path | None = None, progress: bool = True) -> dict:
    """Train ``model.decoder`` alone on the frozen LLM's mapped states of the distinct descriptions ``texts``
    against ``profiles`` [n cells, G] (the training cells' log1p HVG profiles), cell ``i`` being described by
    ``texts[text_index[i]]``. Returns the mean ``decode_llm`` loss of the first and last logging windows and
    how many descriptions ran through the LLM; with ``log_path``, appends one JSON line per window there."""
    text_index = torch.as_tensor(text_index, dtype=torch.long)
    if len(text_index) != len(profiles) or len(profiles) == 0:
        raise ValueError(f"refit needs one description per profile ({len(text_index)} indices, "
                         f"{len(profiles)} profiles)")
    if opts.steps == 0:
        return {"steps": 0, "first_window": None, "last_window": None, "distinct_texts": 0}
    model.eval()
    decoder = model.decoder
    dtype, device = decoder.mean_head.weight.dtype, decoder.mean_head.weight.device
    cache: dict[int, torch.Tensor] = {}  # description index -> its mapped states [n, d_q]

    @torch.no_grad()
    def states_of(ids: list[int]) -> torch.Tensor:
        new = sorted({i for i in ids if i not in cache})
        if new:
            for i, s in zip(new, model.mapped_states([str(texts[i]) for i in new])):
                cache[i] = s.to(device=device, dtype=dtype)
        return torch.stack([cache[i] for i in ids])

    def batches() -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            yield torch.randint(0, len(profiles), (min(opts.batch_size, len(profiles)),), generator=gen)

    def forward(module, rows: torch.Tensor, step: int) -> dict:
        loss = decoder_loss(module(states_of(text_index[rows].tolist())), profiles[rows].to(device), nll_weight)
        return {"loss": loss, "decode_llm": loss}

    was = [p.requires_grad for p in decoder.parameters()]
    for p in decoder.parameters():
        p.requires_grad_(True)
    trainer = Trainer(decoder, opts.train_options(), name="decoder refit", loss_keys=("decode_llm",),
                      param_groups=decay_groups(decoder.named_parameters(), 0.0),
                      metrics_path=log_path, progress=progress)
    trainer.fit(batches(), forward, items=lambda rows: (len(rows), []))
    decoder.eval()
    for p, w in zip(decoder.parameters(), was):
        p.requires_grad_(w)
    windows = [line["decode_llm"] for line in trainer.history]
    return {"steps": opts.steps, "first_window": windows[0], "last_window": windows[-1], "distinct_texts": len(cache)}
