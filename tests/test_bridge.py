"""The pseudo-cell decoder's zero model (hurdle): its loss on hand-computed values, its start, its draws."""
import math

import pytest
import torch

from scmm.model.bridge import DecoderOutput, PseudoCellDecoder, decoder_loss


def test_zero_model_loss_on_hand_computed_values():
    target = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    out = DecoderOutput(mean=torch.ones(2, 2), log_std=torch.zeros(2, 2), zero_logit=torch.zeros(2, 2))
    mse = (1 + 1 + 4 + 1) / 4  # the expected value, zeros included
    bce = math.log(2.0)  # p = 0.5 for every gene
    assert float(decoder_loss(out, target)) == pytest.approx(mse + bce, abs=1e-6)
    # a detected gene's mean is mean / (1 - p) = 2: the NLL (std 1) over the detected values only
    nll_detected = (0.5 * (2 - 2) ** 2 + 0.5 * (3 - 2) ** 2) / 2
    assert float(decoder_loss(out, target, nll_weight=0.5)) == pytest.approx(mse + bce + 0.5 * nll_detected,
                                                                             abs=1e-6)


def test_dense_loss_is_unchanged_without_a_zero_model():
    target = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    out = DecoderOutput(mean=torch.ones(2, 2), log_std=torch.zeros(2, 2))
    assert float(decoder_loss(out, target)) == pytest.approx((1 + 1 + 4 + 1) / 4, abs=1e-6)
    assert float(decoder_loss(out, target, nll_weight=1.0)) == pytest.approx(7 / 4 + 0.5 * 7 / 4, abs=1e-6)


def test_init_from_profiles_starts_at_the_mean_the_share_of_zeros_and_the_detected_spread():
    profiles = torch.tensor([[0.0, 2.0, 1.0], [0.0, 4.0, 0.0], [0.0, 3.0, 0.0], [5.0, 3.0, 0.0]])
    dec = PseudoCellDecoder(n_queries=2, d_query=4, n_genes=3, hidden=8)
    dec.init_from_profiles(profiles)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(dec.zero_head.bias), torch.tensor([0.75, 0.001, 0.75]),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(dec.mean_head.bias, torch.tensor([1.25, 3.0, 0.25]))
        # the spread of the detected values (ddof 1; a single value: floored)
        assert float(dec.log_std_head.bias[1]) == pytest.approx(math.log(math.sqrt(2 / 3)), abs=1e-5)


def test_samples_are_as_sparse_as_the_zero_model_says_and_average_to_the_mean():
    dec = PseudoCellDecoder(n_queries=2, d_query=4, n_genes=400, hidden=8)
    p_zero = torch.linspace(0.1, 0.9, 400)
    with torch.no_grad():
        for head in (dec.zero_head, dec.mean_head, dec.log_std_head):
            head.weight.zero_()
        dec.zero_head.bias.copy_(torch.logit(p_zero))
        dec.mean_head.bias.copy_(3.0 * (1 - p_zero))  # so that a detected gene's mean is 3 for every gene
        dec.log_std_head.bias.fill_(math.log(0.1))
    states = torch.randn(500, 2, 4)
    x = dec.sample(states, generator=torch.Generator().manual_seed(0))
    assert float((x == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    per_gene = (x == 0).float().mean(0)
    assert float(per_gene[:40].mean()) < 0.16 and float(per_gene[-40:].mean()) > 0.84
    assert float(x[x > 0].mean()) == pytest.approx(3.0, abs=0.01)  # a detected gene takes its detected value
    torch.testing.assert_close(x.mean(0)[::40], 3.0 * (1 - p_zero[::40]), atol=0.15, rtol=0)  # the mean profile
    assert torch.equal(x, dec.sample(states, generator=torch.Generator().manual_seed(0)))
    expected = dec.sample(states, noise=0.0)  # noise 0: the expected profile, no draw
    torch.testing.assert_close(expected[0], 3.0 * (1 - p_zero), atol=1e-5, rtol=1e-5)


def test_a_decoder_without_zero_model_samples_dense_profiles():
    dec = PseudoCellDecoder(n_queries=1, d_query=4, n_genes=50, hidden=8, zero_inflated=False)
    with torch.no_grad():
        dec.mean_head.weight.zero_()
        dec.mean_head.bias.fill_(3.0)
    assert dec.zero_head is None and "zero_head.weight" not in dec.state_dict()
    x = dec.sample(torch.randn(20, 1, 4), generator=torch.Generator().manual_seed(0))
    assert float((x == 0).float().mean()) < 0.01
