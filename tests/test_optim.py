"""The one weight-decay rule (scmm.model.optim.decay_groups) and its users."""
import torch
from torch import nn

from scmm.model.optim import decay_groups


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.embed_tokens = nn.Embedding(5, 4)
        self.logit_scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


def test_matrices_decay_and_the_rest_do_not():
    m = _Toy()
    decayed, kept = decay_groups(m.named_parameters(), 0.1, keep=("embed_tokens",), lr=1e-3)
    assert _ids(decayed) == {id(m.proj.weight)}
    assert _ids(kept) == {id(m.proj.bias), id(m.norm.weight), id(m.norm.bias), id(m.embed_tokens.weight),
                          id(m.logit_scale)}
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.1, 0.0)
    assert decayed["lr"] == kept["lr"] == 1e-3
    # frozen parameters are in no group; without keep, the embedding is a matrix and decays
    decayed, _ = decay_groups(m.named_parameters(), 0.1)
    assert _ids(decayed) == {id(m.proj.weight), id(m.embed_tokens.weight)}
    assert "lr" not in decayed
