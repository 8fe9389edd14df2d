"""The stage-2 bridge between the cell side (Q-Former query states) and the language model.

Four small modules, each one idea:

* :class:`CellProjector`: Q-Former query states ``[B, n, d_q]`` (optionally each joined with the cell tower's
  ``<cls>`` embedding, ``BridgeOptions.cell_embedding``) -> soft tokens in the LLM's embedding space ``[B, n, H]``
  (placed between ``<cell>`` and ``</cell>``; cell -> text).
* :class:`TextToCellHead`: the LLM's hidden states at the cell slot tokens ``[B, n, H]`` -> the Q-Former query
  space ``[B, n, d_q]`` (text -> cell; trained against the paired real cell's query states, stop-gradient).
* :class:`PseudoCellDecoder`: query states ``[B, n, d_q]`` (real or LLM-mapped) -> a pseudo-cell profile over
  a gene panel (the corpus's highly variable genes), as :class:`DecoderOutput`. Each gene's expected
  log1p-CP10k value ``mean`` (zeros included) and a log standard deviation that sets the sampling noise; with
  ``zero_inflated`` (the default) also the probability that the gene is not detected (``zero_logit``), so that
  samples are sparse like real cells: ``sample(states, generator)`` draws each gene's detection, then a detected
  gene's value ``max(0, mean / (1 - p_zero) + std * eps)``. **Decision**: the mean stays the expected value
  (zeros included, trained by squared error as without a zero model) and a detected gene's mean is derived from
  it, rather than a separate head for the detected values: so the samples' average is the profile the squared
  error fits, and adding the zero model leaves the pseudo-cells' type means where they were (a separately
  fitted detected-value head gave type means further from the real ones on the demo: BENCHMARKS.md). Without
  ``zero_inflated`` (stage-2 folders of format 3) samples are ``max(0, mean + std * eps)``: dense.

**Why zeros are modelled**: about 70% of the panel's values are zeros in a real PBMC cell, and a detected gene's
log1p-CP10k value starts near 2 (one count in a cell of a few thousand). A dense profile (the mean with noise)
holds hundreds of small values that no real cell has; the cell tower, which reads a cell as its expressed genes,
then places it among the wrong cells (BENCHMARKS.md, "Sparse pseudo-cells").

* :class:`ProgramReader` (``BridgeOptions.programs``): the cell's expression over the genes of the corpus's
  programs (standardised with training statistics) -> its hallmark-program activities ``[B, P]``, a ridge
  regression fitted once on the training cells' per-cell program scores. Its top programs are written into the
  prompt (:mod:`scmm.model.stage2`): what stage 1 keeps of a cell's programs within a type is little (a probe
  reads 0.57 from its embedding against 0.94 from the expression, BENCHMARKS.md), so the LLM is told them from
  the expression directly.
* :class:`MarkerReader` (``BridgeOptions.markers``): the cell's most over-expressed genes, by the corpus's marker
  statistic (:mod:`scmm.data_pipeline.facts`: z-score against the training cells' gene mean and sd, among genes
  the cell expresses and at least 1 % of training cells do) on the values the cell tower gets, with the moments
  taken from the training cells in the same encoding. Its first genes are written into the prompt the same way:
  the soft tokens of a 4-layer demo LLM or a 135M one carry no gene symbols it could spell (57 % of the symbols
  SmolLM2 named without it were not genes).

The losses live here too (:func:`decoder_loss`, :func:`t2c_loss`), so that a trainer only weights them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BridgeOptions:
    """The bridge's three heads, field by field (a hidden width of 0: the wider of the two sides), and what they
    share."""

    # cell -> LLM projector: query states (and optionally the <cls> embedding) to soft tokens
    projector_hidden: int = 0
    standardize: bool = False  # z-score query states with training statistics (QueryNorm); off: identity
    # each soft token also reads the cell tower's <cls> embedding (scGPT's cell embedding) beside its query state
    cell_embedding: bool = False
    # every prompt is told the cell's top programs as predicted from its expression (ProgramReader), as text;
    # needs a corpus with per-cell facts
    programs: bool = False
    # every prompt is told the cell's most over-expressed genes, read from its expression (MarkerReader), as text
    markers: bool = False
    # text -> cell head: LLM hidden states to query states
    t2c_hidden: int = 0
    t2c_loss: str = "mse"  # mse | cosine (per slot)
    # pseudo-cell decoder: query states to expression
    decoder_hidden: int = 512
    # the decoder models each gene's probability of being zero (a hurdle model): sparse pseudo-cells like real ones
    zero_inflated: bool = True
    nll_weight: float = 0.1  # weight of the Gaussian NLL that trains the decoder's log-std (LLM path)
    min_log_std: float = -4.0
    max_log_std: float = 1.5
    # all three
    dropout: float = 0.0
    lr_scale: float = 1.0  # learning rate of the bridge modules relative to train.lr (they start from scratch)

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


class GenePanel(nn.Module):
    """Reads a loader-style batch (gene vocabulary ids, values, padding mask) as dense values over a fixed gene panel
    (vocabulary ids ``vocab_ids``, in that column order); genes outside the panel are ignored."""

    def __init__(self, vocab_ids):
        super().__init__()
        vocab_ids = torch.as_tensor(list(vocab_ids), dtype=torch.long)
        column = torch.full((int(vocab_ids.max()) + 1 if len(vocab_ids) else 1,), -1, dtype=torch.long)
        column[vocab_ids] = torch.arange(len(vocab_ids))
        self.n_genes = len(vocab_ids)
        self.register_buffer("column", column)

    def vocab_ids(self) -> list[int]:
        """The panel's vocabulary ids in column order (what built it)."""
        ids = torch.nonzero(self.column >= 0)[:, 0]
        return ids[torch.argsort(self.column[ids])].tolist()

    def panel_values(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``[B, G]``: each cell's values over the panel's genes (0 for genes it does not express)."""
        ids = gene_ids.long()
        inside = (ids >= 0) & (ids < len(self.column)) & ~padding_mask.bool()
        col = torch.where(inside, self.column[ids.clamp(0, len(self.column) - 1)], -1)
        keep = col >= 0
        out = torch.zeros(ids.shape[0], self.n_genes + 1, dtype=torch.float32, device=ids.device)
        out.scatter_(1, torch.where(keep, col, self.n_genes), torch.where(keep, values.float(), 0.0))
        return out[:, :self.n_genes]


READER_RIDGE = 1e-2  # the program reader's ridge, relative to each standardised gene's unit variance


class ProgramReader(GenePanel):
    """A cell's program activities ``[B, P]`` from its expressed genes: its values over the genes of the programs
    (vocabulary ids ``vocab_ids``; other genes are ignored), standardised per gene with training statistics, then a
    linear map fitted in closed form (:meth:`fit`, ridge regression on the training cells' program scores).

    The values are whatever the cell encoding feeds the cell tower (log1p CP10k, or bins), so the reader needs
    nothing the tower does not get. On log1p CP10k the corpus's scores are linear in exactly these values (the mean
    z-score of a set's genes), so the fit recovers them; on bins it approximates them. Fitted once before stage 2
    trains, not by gradient: a 300-gene linear map under the bridge's Adam steps oscillates at a noise floor
    (squared error 0.8 of a unit variance after 50 demo steps)."""

    def __init__(self, vocab_ids, n_programs: int):
        super().__init__(vocab_ids)
        self.register_buffer("mean", torch.zeros(self.n_genes))
        self.register_buffer("std", torch.ones(self.n_genes))
        self.register_buffer("weight", torch.zeros(n_programs, self.n_genes))
        self.register_buffer("bias", torch.zeros(n_programs))

    @torch.no_grad()
    def fit(self, pairs, ridge: float = READER_RIDGE) -> dict[str, float]:
        """Fit the standardisation and the map from ``pairs``: an iterable of (panel values ``[b, G]``, program
        scores ``[b, P]``) of training cells, summed in float64 one block at a time (memory ``G * (G + P)``).
        Returns the fit's ``r2`` (mean over programs, on the training cells) and ``n_cells``."""
        g, p = self.n_genes, self.weight.shape[0]
        n, sx, sy = 0, torch.zeros(g, dtype=torch.float64), torch.zeros(p, dtype=torch.float64)
        sxx, sxy = torch.zeros(g, g, dtype=torch.float64), torch.zeros(g, p, dtype=torch.float64)
        syy = torch.zeros(p, dtype=torch.float64)
        for x, y in pairs:
            x, y = x.double().cpu(), y.double().cpu()
            n += len(x)
            sx += x.sum(0)
            sy += y.sum(0)
            sxx += x.T @ x
            sxy += x.T @ y
            syy += (y * y).sum(0)
        if n < 2:
            raise ValueError("the program reader needs at least 2 training cells")
        mean, ymean = sx / n, sy / n
        cov = sxx / n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-3)
        czz = cov / torch.outer(std, std)
        czy = (sxy / n - torch.outer(mean, ymean)) / std[:, None]
        w = torch.linalg.solve(czz + ridge * torch.eye(g, dtype=torch.float64), czy)  # [G, P]
        yvar = (syy / n - ymean ** 2).clamp_min(1e-12)
        explained = (w * czy).sum(0) * 2 - (w * (czz @ w)).sum(0)  # variance explained, per program
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())
        self.weight.copy_(w.T.float())
        self.bias.copy_(ymean.float())
        return {"r2": float((explained / yvar).mean()), "n_cells": n}

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        z = (self.panel_values(gene_ids, values, padding_mask) - self.mean) / self.std
        return z @ self.weight.T.to(z.dtype) + self.bias.to(z.dtype)


class MarkerReader(GenePanel):
    """A cell's most over-expressed genes (panel columns) from its expressed genes, by the corpus's marker
    statistic (:mod:`scmm.data_pipeline.facts`): each gene's z-score against the training cells' mean and
    population sd, among the genes the cell expresses (value > 0) with ``z > 0`` that at least ``min_detection`` of
    training cells express; ties go to the lower column. The moments are fitted (:meth:`fit`) on the values the cell
    tower is fed, so on log1p CP10k (``n_bins: 0``) the picks are the corpus's markers exactly, and on bins they
    are the same statistic on the bins."""

    def __init__(self, vocab_ids, min_detection: float):
        super().__init__(vocab_ids)
        self.min_detection = float(min_detection)
        self.register_buffer("mean", torch.zeros(self.n_genes))
        self.register_buffer("std", torch.zeros(self.n_genes))
        self.register_buffer("detected", torch.zeros(self.n_genes))

    @torch.no_grad()
    def fit(self, values) -> dict[str, float]:
        """Fit the moments from ``values``: an iterable of panel values ``[b, G]`` of training cells (float64 sums).
        Returns ``n_cells`` and ``n_eligible`` (genes that can be picked)."""
        n, s, ss = 0, torch.zeros(self.n_genes, dtype=torch.float64), torch.zeros(self.n_genes, dtype=torch.float64)
        seen = torch.zeros(self.n_genes, dtype=torch.float64)
        for x in values:
            x = x.double().cpu()
            n += len(x)
            s += x.sum(0)
            ss += (x * x).sum(0)
            seen += (x > 0).sum(0)
        if n < 1:
            raise ValueError("the marker reader needs at least 1 training cell")
        mean = s / n
        self.mean.copy_(mean.float())
        self.std.copy_((ss / n - mean * mean).clamp_min(0).sqrt().float())
        self.detected.copy_((seen / n).float())
        return {"n_cells": n, "n_eligible": int(self._eligible().sum())}

    def _eligible(self) -> torch.Tensor:
        return (self.detected >= self.min_detection) & (self.std > 0)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor,
                k: int) -> torch.Tensor:
        """``[B, k]`` panel columns of each cell's ``k`` highest-scoring genes, -1 where fewer qualify."""
        x = self.panel_values(gene_ids, values, padding_mask)
        z = (x - self.mean) / torch.where(self.std > 0, self.std, torch.ones_like(self.std))
        score = torch.where(self._eligible() & (x > 0) & (z > 0), z, torch.full_like(z, -torch.inf))
        order = torch.argsort(-score, dim=1, stable=True)[:, :k]
        return torch.where(torch.isfinite(score.gather(1, order)), order, -1)


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


class DecoderOutput(NamedTuple):
    """A decoded profile over the gene panel, each ``[B, G]``: the expected log1p value ``mean`` (zeros included),
    the log standard deviation of a value (of a detected gene's, with a zero model) and, with a zero model, the
    logit of each gene being zero."""

    mean: torch.Tensor
    log_std: torch.Tensor
    zero_logit: torch.Tensor | None = None

    def detected_mean(self) -> torch.Tensor:
        """A detected gene's mean value, ``mean / (1 - p_zero)`` (the mean itself without a zero model)."""
        if self.zero_logit is None:
            return self.mean
        p_detected = torch.sigmoid(-self.zero_logit.float()).clamp_min(MIN_DETECTION)
        return self.mean.float().clamp_min(0.0) / p_detected


MIN_DETECTION = 0.01  # a gene's detection probability is floored here when dividing by it


class PseudoCellDecoder(nn.Module):
    """Query states ``[B, n, d_q]`` -> :class:`DecoderOutput` over the gene panel (see the module docstring)."""

    def __init__(self, n_queries: int, d_query: int, n_genes: int, hidden: int = 512, dropout: float = 0.0,
                 min_log_std: float = -4.0, max_log_std: float = 1.5, zero_inflated: bool = True):
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
        self.zero_head = nn.Linear(hidden, n_genes) if zero_inflated else None
        nn.init.zeros_(self.log_std_head.weight)
        nn.init.zeros_(self.log_std_head.bias)

    @torch.no_grad()
    def init_from_profiles(self, profiles: torch.Tensor) -> None:
        """Start at the per-gene statistics of ``profiles`` (e.g. the training cells): the mean, the spread (of the
        detected values under ``zero_inflated``) and the share of zeros."""
        profiles = profiles.float()
        self.mean_head.bias.copy_(profiles.mean(0).to(self.mean_head.bias))
        if self.zero_head is None:
            std = profiles.std(0)
        else:
            detected = profiles > 0
            n = detected.sum(0).float()
            zero = (1 - n / len(profiles)).clamp(1e-3, 1 - 1e-3)
            self.zero_head.bias.copy_(torch.logit(zero).to(self.zero_head.bias))
            mean = (profiles * detected).sum(0) / n.clamp_min(1)
            std = (((profiles - mean) ** 2 * detected).sum(0) / (n - 1).clamp_min(1)).sqrt()
        log_std = std.clamp_min(1e-3).log().clamp(self.min_log_std, self.max_log_std)
        self.log_std_head.bias.copy_(log_std.to(self.log_std_head.bias))

    def forward(self, query_states: torch.Tensor) -> DecoderOutput:
        h = self.body(self.norm(query_states).flatten(1))
        log_std = self.log_std_head(h).clamp(self.min_log_std, self.max_log_std)
        zero_logit = self.zero_head(h) if self.zero_head is not None else None
        return DecoderOutput(self.mean_head(h), log_std, zero_logit)

    @torch.no_grad()
    def sample(self, query_states: torch.Tensor, generator: torch.Generator | None = None,
               noise: float = 1.0) -> torch.Tensor:
        """Pseudo-cell profiles ``[B, G]`` with draws from ``generator``: each gene detected with probability
        ``1 - p_zero`` (zero model only), a detected value ``max(0, detected mean + noise * std * eps)``.
        ``noise=0`` gives the expected profile ``max(0, mean)`` instead of a draw."""
        out = self(query_states)
        if noise == 0:
            return out.mean.float().clamp_min(0.0)
        eps = torch.randn(out.mean.shape, generator=generator, dtype=torch.float32).to(out.mean.device)
        value = (out.detected_mean() + noise * out.log_std.float().exp() * eps).clamp_min(0.0)
        if out.zero_logit is None:
            return value
        uniform = torch.rand(out.mean.shape, generator=generator, dtype=torch.float32).to(out.mean.device)
        return torch.where(uniform < torch.sigmoid(out.zero_logit.float()), torch.zeros_like(value), value)


def decoder_loss(out: DecoderOutput, target: torch.Tensor, nll_weight: float = 0.0) -> torch.Tensor:
    """The decoder's loss against real profiles ``target`` [B, G]: the mean's squared error; with a zero model,
    plus the binary cross-entropy of each gene being zero; with ``nll_weight`` > 0, plus that weight times a
    Gaussian NLL that fits the log-std around the detached (detected) mean, over the detected values only when
    there is a zero model (its spread is that of a detected gene's value)."""
    target = target.float()
    loss = F.mse_loss(out.mean.float(), target)
    if out.zero_logit is not None:
        loss = loss + F.binary_cross_entropy_with_logits(out.zero_logit.float(), (target <= 0).float())
    if nll_weight > 0:
        ls = out.log_std.float()
        nll = 0.5 * (target - out.detected_mean().detach()) ** 2 * torch.exp(-2 * ls) + ls
        if out.zero_logit is None:
            nll = nll.mean()
        else:
            detected = (target > 0).float()
            nll = (nll * detected).sum() / detected.sum().clamp_min(1.0)
        loss = loss + nll_weight * nll
    return loss


def t2c_loss(mapped: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance of the LLM-mapped slot states to the (detached) query states of the paired real cell."""
    target = target.detach().float()
    mapped = mapped.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(mapped, target, dim=-1)).mean()
    return F.mse_loss(mapped, target)


__all__ = ["BridgeOptions", "QueryNorm", "GenePanel", "ProgramReader", "MarkerReader", "CellProjector",
           "TextToCellHead", "PseudoCellDecoder", "DecoderOutput", "MIN_DETECTION", "decoder_loss", "t2c_loss"]
