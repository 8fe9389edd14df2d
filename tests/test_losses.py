"""Stage-1 losses: hand-computed contrastive values, cross-rank gathering (2 gloo processes), masking, ITM."""
import math
import os
import socket

import pytest
import torch

from scmm.model.losses import (
    contrastive_loss,
    gather_features,
    gather_labels,
    itm_hard_negatives,
    itm_loss,
    mask_values,
    masked_expression_loss,
)

# ------------------------------------------------------------------------------------------ contrastive, by hand

# cells c0=(1,0), c1=(0,1), c2=(.6,.8); texts t0=(1,0), t1=(.6,.8), t2=(0,1); logit scale s = 2.
CELLS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
TEXTS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
# s * <c_i, t_j>, written out:  row i = cell i, column j = text j
#   c0: 2*1=2,  2*.6=1.2,  2*0=0
#   c1: 0,      2*.8=1.6,  2*1=2
#   c2: 2*.6=1.2, 2*(.36+.64)=2, 2*.8=1.6
E = math.exp


def _ce(pos, row):
    """-logit_pos + log sum exp(row), written out."""
    return -pos + math.log(sum(E(x) for x in row))


def test_contrastive_loss_matches_hand_computation():
    c2t = [_ce(2.0, [2.0, 1.2, 0.0]), _ce(1.6, [0.0, 1.6, 2.0]), _ce(1.6, [1.2, 2.0, 1.6])]
    t2c = [_ce(2.0, [2.0, 0.0, 1.2]), _ce(1.6, [1.2, 1.6, 2.0]), _ce(1.6, [0.0, 2.0, 1.6])]   # the transpose
    expected = (sum(c2t) / 3 + sum(t2c) / 3) / 2
    got = contrastive_loss(CELLS, TEXTS, 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_same_label_masking_removes_exactly_those_negatives():
    labels = torch.tensor([0, 1, 0])  # pairs 0 and 2 share a label: (0,2) and (2,0) leave the denominators
    c2t = [_ce(2.0, [2.0, 1.2]), _ce(1.6, [0.0, 1.6, 2.0]), _ce(1.6, [2.0, 1.6])]
    t2c = [_ce(2.0, [2.0, 0.0]), _ce(1.6, [1.2, 1.6, 2.0]), _ce(1.6, [2.0, 1.6])]
    expected = (sum(c2t) / 3 + sum(t2c) / 3) / 2
    masked = contrastive_loss(CELLS, TEXTS, 2.0, labels=labels)
    plain = contrastive_loss(CELLS, TEXTS, 2.0)
    assert masked.item() == pytest.approx(expected, rel=1e-6)
    # the change is exactly the removed terms: c2t row 0 loses exp(0), row 2 loses exp(1.2); t2c the same pair
    delta = (math.log(E(2) + E(1.2)) - math.log(E(2) + E(1.2) + E(0))
             + math.log(E(2) + E(1.6)) - math.log(E(1.2) + E(2) + E(1.6))
             + math.log(E(2) + E(0)) - math.log(E(2) + E(0) + E(1.2))
             + math.log(E(2) + E(1.6)) - math.log(E(0) + E(2) + E(1.6))) / 6
    assert (masked - plain).item() == pytest.approx(delta, rel=1e-5)
    # unknown labels (-1) never match: same as no labels
    unknown = contrastive_loss(CELLS, TEXTS, 2.0, labels=torch.tensor([-1, 1, -1]))
    assert unknown.item() == pytest.approx(plain.item(), rel=1e-7)


def test_contrastive_loss_has_gradients_and_finite_with_masking():
    c = CELLS.clone().requires_grad_(True)
    scale = torch.tensor(2.0, requires_grad=True)
    loss = contrastive_loss(c, TEXTS, scale, labels=torch.tensor([3, 3, 3]))  # every negative masked
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(scale.grad)


# ------------------------------------------------------------------------------------------ 2 ranks on gloo

N_PER_RANK, DIM, WORLD = 4, 5, 2


def _global_batch():
    g = torch.Generator().manual_seed(7)
    cells = torch.nn.functional.normalize(torch.randn(WORLD * N_PER_RANK, DIM, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(WORLD * N_PER_RANK, DIM, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, -1, 1, 0, 3, -1])   # same-label pairs inside and across ranks
    return cells, texts, labels, 3.0


def _dist_worker(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cells, texts, labels, s = _global_batch()
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        c = cells[rows].clone().requires_grad_(True)
        t = texts[rows].clone().requires_grad_(True)
        scale = torch.tensor(s, requires_grad=True)
        loss = contrastive_loss(c, t, scale, labels=labels[rows], rank=rank, world_size=WORLD)
        loss.backward()
        ragged = gather_labels(torch.arange(rank + 1), rank, WORLD)             # ranks with 1 and 2 rows
        plain = gather_features(torch.full((2, 3), float(rank)), rank, WORLD)
        torch.save({"loss": loss.detach(), "c": c.grad, "t": t.grad, "scale": scale.grad,
                    "ragged": ragged, "plain": plain}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_two_rank_loss_and_gradients_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    cells, texts, labels, s = _global_batch()
    c = cells.clone().requires_grad_(True)
    t = texts.clone().requires_grad_(True)
    scale = torch.tensor(s, requires_grad=True)
    full = contrastive_loss(c, t, scale, labels=labels)
    full.backward()

    # loss: each rank averages over its own rows, so the mean over ranks is the global-batch loss
    assert torch.stack([r["loss"] for r in res]).mean().item() == pytest.approx(full.item(), rel=1e-5)
    # features: a rank's gradient is world_size x the global gradient of its rows, so that DDP averaging
    # (sum over ranks / world_size) of the parameter gradients gives exactly the global-batch gradient
    for r, out in enumerate(res):
        rows = slice(r * N_PER_RANK, (r + 1) * N_PER_RANK)
        torch.testing.assert_close(out["c"], WORLD * c.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["t"], WORLD * t.grad[rows], rtol=1e-5, atol=1e-6)
    # a replicated parameter (the logit scale): the DDP average of the rank gradients is the global gradient
    torch.testing.assert_close(torch.stack([r["scale"] for r in res]).mean(), scale.grad, rtol=1e-5, atol=1e-6)
    # gathers: rank order, ragged sizes allowed
    assert res[0]["ragged"].tolist() == [0, 0, 1] == res[1]["ragged"].tolist()
    assert res[0]["plain"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_features(x, 0, 1) is x
    assert gather_features(x, 0, 4) is x          # torch.distributed not initialised
    y = torch.arange(3)
    assert gather_labels(y, 0, 1) is y


# ------------------------------------------------------------------------------------------ masking

def test_mask_values_never_masks_padding_or_cls_and_masks_the_ratio():
    lengths = [50, 31, 12, 2]
    values = torch.rand(4, 50) + 1.0
    padding = torch.arange(50)[None, :] >= torch.tensor(lengths)[:, None]
    values[padding] = -2.0
    g = torch.Generator().manual_seed(0)
    masked, mask = mask_values(values, padding, 0.25, mask_value=-1.0, generator=g)
    assert not (mask & padding).any()
    assert not mask[:, 0].any()
    assert mask.sum(1).tolist() == [math.floor(0.25 * (n - 1)) for n in lengths]
    assert (masked[mask] == -1.0).all()
    assert torch.equal(masked[~mask], values[~mask])
    # deterministic per generator, different across seeds
    again, mask2 = mask_values(values, padding, 0.25, mask_value=-1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask2) and torch.equal(masked, again)
    _, mask3 = mask_values(values, padding, 0.25, mask_value=-1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(mask, mask3)
    # over many rows the share is the ratio
    big = torch.rand(64, 201)
    _, m = mask_values(big, None, 0.4, mask_value=-1.0, generator=torch.Generator().manual_seed(2))
    assert not m[:, 0].any()
    assert m[:, 1:].float().mean().item() == pytest.approx(0.4, abs=0.005)
    assert m[:, 1:].float().mean(0).std().item() > 0          # positions vary


def test_masked_expression_loss_ignores_unmasked_positions():
    pred = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    target = torch.tensor([[0.0, 2.0, 0.0], [4.0, 0.0, 9.0]])
    mask = torch.tensor([[True, False, False], [False, True, True]])
    loss = masked_expression_loss(pred, target, mask)
    assert loss.item() == pytest.approx((1.0 ** 2 + 5.0 ** 2 + 3.0 ** 2) / 3)
    # anything at unmasked positions (even NaN) changes nothing
    wild_pred = pred.detach().clone()
    wild_pred[~mask] = float("nan")
    wild_target = target.clone()
    wild_target[~mask] = 1e6
    wild_pred.requires_grad_(True)
    wild = masked_expression_loss(wild_pred, wild_target, mask)
    assert wild.item() == pytest.approx(loss.item())
    wild.backward()
    assert torch.isfinite(wild_pred.grad).all() and (wild_pred.grad[~mask] == 0).all()
    # nothing masked: 0 with a graph
    zero = masked_expression_loss(pred, target, torch.zeros_like(mask))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert (pred.grad == 0).all()


# ------------------------------------------------------------------------------------------ matching

def test_hard_negatives_exclude_positive_and_same_label():
    labels = torch.tensor([0, 0, 1, 1, 2, -1, -1])
    n = len(labels)
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 3
    for seed in range(30):
        neg_t, neg_c = itm_hard_negatives(sim, sim.t(), labels, generator=torch.Generator().manual_seed(seed))
        for i in range(n):
            for j in (int(neg_t[i]), int(neg_c[i])):
                assert j != i
                assert labels[i] < 0 or labels[j] != labels[i]
    a = itm_hard_negatives(sim, sim.t(), labels, generator=torch.Generator().manual_seed(3))
    b = itm_hard_negatives(sim, sim.t(), labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hard_negatives_follow_similarity_and_flag_rows_without_candidates():
    # the hardest admissible column dominates the softmax; the positive (huge) is never drawn
    sim = torch.zeros(3, 3)
    sim[:, 0] = 50.0
    sim[0, 0] = 100.0
    neg_t, _ = itm_hard_negatives(sim, sim, None, generator=torch.Generator().manual_seed(0))
    assert neg_t.tolist()[1:] == [0, 0] and neg_t[0].item() in (1, 2)
    # one label for all: no admissible negative -> -1
    neg_t, neg_c = itm_hard_negatives(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([4, 4]))
    assert neg_t.tolist() == [-1, -1] and neg_c.tolist() == [-1, -1]
    # candidates from a larger (gathered) pool: positive of row i is column offset + i
    labels = torch.tensor([0, 2, 2, 3, 1, 3])       # rows are candidates 2 (label 2) and 3 (label 3)
    for seed in range(20):
        neg_t, neg_c = itm_hard_negatives(torch.randn(2, 6), torch.randn(2, 6), labels, offset=2,
                                          generator=torch.Generator().manual_seed(seed))
        for neg in (neg_t, neg_c):
            assert neg[0].item() in (0, 3, 4, 5) and neg[1].item() in (0, 1, 2, 4)


def test_itm_loss_is_cross_entropy():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    targets = torch.tensor([1, 0])
    expected = (-(2.0 - math.log(E(0) + E(2))) - (1.0 - math.log(E(1) + E(-1)))) / 2
    assert itm_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
