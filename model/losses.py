"""Stage-1 losses: cross-rank contrastive loss, cell–text matching with hard negatives, masked expression.

One idea per function. Conventions: features are [batch, dim]; ``labels`` are integer label ids (e.g. a
cell-type index) with -1 = unknown (never equal to anything); padding masks are True = padding.

Gradients across ranks (``gather_features``): every rank computes the loss of its LOCAL rows against ALL
gathered columns, averaged over its local rows. The gathered tensor holds this rank's own tensor at its
position, so the local slice keeps its gradient, and the backward pass also sums (all-reduce) the gradients
that the other ranks' losses send to this rank's features (they are negatives there). Hence on every rank

    grad(local features of L_rank) == world_size * grad(same rows of L_global)

where L_global is the single-process loss on the concatenated batch (equal local batch sizes), and DDP /
DeepSpeed gradient averaging over ranks gives exactly grad(L_global) for the parameters. The mean over ranks of
L_rank equals L_global. (The cheaper open_clip variant without the backward all-reduce, ``with_grad=False``,
drops the peer terms and is not exact.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------- gathering

def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _gather_sizes(n_local: int, world_size: int, device) -> list[int]:
    """Row count of every rank."""
    n = torch.tensor([n_local], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(t: torch.Tensor, world_size: int, sizes: list[int] | None = None) -> list[torch.Tensor]:
    """all_gather along dim 0 allowing different row counts per rank (pads to the largest, then trims)."""
    if sizes is None:
        sizes = _gather_sizes(t.shape[0], world_size, t.device)
    most = max(sizes)
    t = t.contiguous()
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0],) + tuple(t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return [p[:s] for p, s in zip(parts, sizes)]


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenation of every rank's rows (this rank's own tensor at its slot).
    Backward: all-reduce (sum) of the gradient of the concatenation, then this rank's slice."""

    @staticmethod
    def forward(ctx, local, rank, world_size, sizes):
        parts = _all_gather_rows(local.detach(), world_size, sizes)
        parts[rank] = local
        ctx.offset = sum(p.shape[0] for p in parts[:rank])
        ctx.n = local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset:ctx.offset + ctx.n], None, None, None


def _gather(local, rank, world_size, with_grad, sizes):
    if with_grad and local.requires_grad and torch.is_grad_enabled():
        return _GatherWithGrad.apply(local, rank, world_size, sizes)
    parts = _all_gather_rows(local.detach(), world_size, sizes)
    parts[rank] = local
    return torch.cat(parts)


def gather_features(local: torch.Tensor, rank: int = 0, world_size: int = 1, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``local`` [n, ...] from all ranks along dim 0 (rank order) -> [N, ...].

    This rank's slot is ``local`` itself, so it keeps its gradient. ``with_grad=True`` (default) also brings
    back, in backward, the gradients that other ranks' losses put on this rank's rows (exact global-batch
    gradients, see the module docstring); ``with_grad=False`` is the cheaper approximation that keeps only the
    local loss's gradient. Identity when world_size == 1 or torch.distributed is not initialised.
    Ranks may hold different row counts.
    """
    if not _distributed(world_size):
        return local
    return _gather(local, rank, world_size, with_grad, None)


def gather_labels(labels: torch.Tensor, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Concatenate integer label ids [n] from all ranks (no gradient). Identity when not distributed."""
    if not _distributed(world_size):
        return labels
    return torch.cat(_all_gather_rows(labels.detach(), world_size))


# ----------------------------------------------------------------------------------------------- contrastive

def same_label_mask(row_labels: torch.Tensor, col_labels: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """[n, N] bool: True where row i and column j share a known label (>= 0) and j is not i's positive
    (column row_offset + i). These pairs are excluded as negatives."""
    row_labels, col_labels = row_labels.view(-1), col_labels.view(-1)
    same = (row_labels[:, None] == col_labels[None, :]) & (row_labels[:, None] >= 0)
    idx = torch.arange(row_labels.shape[0], device=same.device)
    same[idx, idx + row_offset] = False
    return same


def contrastive_loss(cell_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor | float,
                     labels: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                     with_grad: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE between paired cells and texts over the global batch.

    Inputs: ``cell_feats``, ``text_feats`` [n, E] local and paired (row i of each is one pair), normally
    L2-normalised by the caller (this function does not normalise); ``logit_scale`` s = exp(learned log scale),
    already exponentiated; ``labels`` [n] optional integer ids per pair (-1 = unknown).

    With C, T the features of all ranks concatenated in rank order ([N, E], one gather of [cell | text]) and
    o = number of rows on lower ranks, for each local row i with positive column p(i) = o + i:

        l_c2t[i, j] = s * <c_i, T_j>,   l_t2c[i, j] = s * <t_i, C_j>
        M[i, j] = labels given and j != p(i) and labels[i] >= 0 and labels[i] == all_labels[j]
        l[i, j] = -inf where M[i, j]            (same-label pairs are not negatives: out of the denominator)
        CE_x(i) = -l_x[i, p(i)] + log sum_j exp(l_x[i, j])
        loss = ( mean_i CE_c2t(i) + mean_i CE_t2c(i) ) / 2

    The positive is never masked. With world_size 1 this is the plain batch loss; across ranks the mean of the
    per-rank losses equals the loss on the concatenated batch (see the module docstring for gradients).
    """
    if cell_feats.shape != text_feats.shape:
        raise ValueError(f"cell and text features differ in shape: {tuple(cell_feats.shape)} vs "
                         f"{tuple(text_feats.shape)}")
    n, e = cell_feats.shape
    device = cell_feats.device
    both = torch.cat([cell_feats, text_feats.to(cell_feats.dtype)], dim=1)
    if _distributed(world_size):
        sizes = _gather_sizes(n, world_size, device)        # once, reused for features and labels
        both = _gather(both, rank, world_size, with_grad, sizes)
        offset = sum(sizes[:rank])
    else:
        sizes, offset = None, 0
    all_cells, all_texts = both[:, :e], both[:, e:]
    targets = torch.arange(n, device=device) + offset

    logits_c2t = logit_scale * cell_feats @ all_texts.t()
    logits_t2c = logit_scale * text_feats.to(cell_feats.dtype) @ all_cells.t()
    if labels is not None:
        labels = labels.to(device).view(-1)
        all_labels = torch.cat(_all_gather_rows(labels, world_size, sizes)) if sizes is not None else labels
        excluded = same_label_mask(labels, all_labels, offset)
        logits_c2t = logits_c2t.masked_fill(excluded, float("-inf"))
        logits_t2c = logits_t2c.masked_fill(excluded, float("-inf"))
    return (F.cross_entropy(logits_c2t.float(), targets) + F.cross_entropy(logits_t2c.float(), targets)) / 2


# ----------------------------------------------------------------------------------------------- matching

@torch.no_grad()
def _sample_negatives(sim: torch.Tensor, excluded: torch.Tensor, generator) -> torch.Tensor:
    """One column per row, drawn with weights softmax(sim) over the non-excluded columns; -1 if none."""
    sim = sim.detach().float().masked_fill(excluded, float("-inf"))
    has = (~excluded).any(dim=1)
    sim = torch.where(has[:, None], sim, torch.zeros_like(sim))      # placeholder row for rows with no choice
    weights = torch.softmax(sim, dim=1)                               # the max finite entry has weight > 0
    if generator is not None and weights.device != generator.device:
        picked = torch.multinomial(weights.to(generator.device), 1, generator=generator).to(sim.device)
    else:
        picked = torch.multinomial(weights, 1, generator=generator)
    return torch.where(has, picked.squeeze(1), torch.full_like(picked.squeeze(1), -1))


@torch.no_grad()
def itm_hard_negatives(sim_c2t: torch.Tensor, sim_t2c: torch.Tensor, labels: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-style hard negatives for cell–text matching, mined in both directions.

    ``sim_c2t`` [n, M]: similarity (or logits) of n cells to M candidate texts; ``sim_t2c`` [n, M]: of n texts to
    M candidate cells; the positive of row i is column ``offset + i`` (offset 0 and M == n for the local batch).
    ``labels`` [M] label ids of the candidates (rows use ``labels[offset:offset + n]``), -1 = unknown.
    For each row, one column is sampled with weights softmax(sim[i]) over the columns that are neither the
    positive nor share row i's known label. Deterministic for a given ``generator``.

    Returns (neg_text_idx_for_each_cell [n], neg_cell_idx_for_each_text [n]) as long tensors; -1 marks a row with
    no admissible negative (drop those rows from the ITM loss).
    """
    n, m = sim_c2t.shape
    if sim_t2c.shape != (n, m):
        raise ValueError(f"sim_t2c has shape {tuple(sim_t2c.shape)}, expected {(n, m)}")
    if labels is None:
        excluded = torch.zeros(n, m, dtype=torch.bool, device=sim_c2t.device)
        idx = torch.arange(n, device=sim_c2t.device)
        excluded[idx, idx + offset] = True
    else:
        labels = labels.to(sim_c2t.device).view(-1)
        excluded = same_label_mask(labels[offset:offset + n], labels, offset)
        idx = torch.arange(n, device=sim_c2t.device)
        excluded[idx, idx + offset] = True
    return _sample_negatives(sim_c2t, excluded, generator), _sample_negatives(sim_t2c, excluded, generator)


def itm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the matching head: logits [N, 2], targets [N] with 1 = matching pair, 0 = not."""
    return F.cross_entropy(logits.float(), targets.long())


# ----------------------------------------------------------------------------------------------- expression

def masked_expression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked positions only (mask True = position was masked and is scored).

    Unmasked positions contribute nothing, not even NaN. Returns 0 (with a graph to ``pred``) when nothing is
    masked."""
    mask = mask.to(torch.bool)
    diff = torch.where(mask, pred.float() - target.float(), torch.zeros((), device=pred.device))
    return (diff ** 2).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def mask_values(values: torch.Tensor, padding_mask: torch.Tensor | None, mask_ratio: float, *,
                mask_value: float, generator: torch.Generator | None = None,
                protect_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """scGPT-style random value masking: in each row, floor(mask_ratio * eligible) of the eligible positions
    (not padding, and not position 0 = ``<cls>`` when ``protect_first``) are chosen uniformly at random and
    set to ``mask_value`` (the model's :attr:`CellEncoding.mask_value <scmm.data_pipeline.encoding.CellEncoding>`:
    no default here, so that the value a model is trained with has one owner).

    values [B, L] float, padding_mask [B, L] bool (True = padding) or None. Returns (masked copy of values,
    mask [B, L] bool, True = masked). Deterministic for a given ``generator``.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    eligible = torch.ones_like(values, dtype=torch.bool) if padding_mask is None else ~padding_mask.to(torch.bool)
    if protect_first and values.shape[1] > 0:
        eligible[:, 0] = False
    k = torch.floor(eligible.sum(dim=1).double() * mask_ratio + 1e-9).long()
    device = generator.device if generator is not None else values.device
    scores = torch.rand(values.shape, generator=generator, device=device).to(values.device)
    scores = scores.masked_fill(~eligible, 2.0)                        # ineligible positions sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    mask = ranks < k[:, None]
    return values.masked_fill(mask, mask_value), mask
