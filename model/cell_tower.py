"""Cell tower: the scGPT ``TransformerModel`` encoder, in plain PyTorch.

The tower turns one cell -- a ``<cls>`` token followed by (gene id, expression value) pairs -- into
per-gene hidden states and a cell embedding (the hidden state at the ``<cls>`` position, scGPT's
``cell_emb_style="cls"``).

It is numerically compatible with scGPT 0.2.4 (``scgpt.model.TransformerModel._encode``):

* gene encoder: ``Embedding(vocab, d, padding_idx=pad_token_id)`` -> ``LayerNorm``;
* value encoder, ``"continuous"``: clamp(max=max_value) -> ``Linear(1, d)`` -> ReLU -> ``Linear(d, d)``
  -> ``LayerNorm`` -> dropout; ``"category"`` (binned values): ``Embedding(n_input_bins, d,
  padding_idx=pad_value)`` -> ``LayerNorm``;
* the two are summed (no positional encoding: a cell is a set of genes) and passed through
  ``nlayers`` encoder layers equal to ``torch.nn.TransformerEncoderLayer(batch_first=True)`` with ReLU
  (post-norm), or to scGPT's ``FlashTransformerEncoderLayer(norm_scheme="pre")`` when ``pre_norm``.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with a key padding mask,
so padded genes are never attended to, and no work is spent on padding: since there is no positional
encoding, a cell's genes can be moved and grouped freely (exactly). In training, columns that are padding
in every row of a batch are dropped before the encoder. At inference (no gradient) cells of similar length
run together: a batch is split into groups whose padding is at most ``GROUP_WASTE`` of their tokens, each
group trimmed to its longest cell (:meth:`CellTower._encode_by_length`). Hidden states at padded positions
are returned as zeros. For speed at inference use bf16 weights (``tower.to(torch.bfloat16)``; the product
does this where bf16 is measured faster, see ``scmm.inference.Options``): cosine similarity to the fp32 cell
embeddings stays above 0.999 (BENCHMARKS.md, "Cell tower").

Native folders are ``config.json`` + ``model.safetensors`` (+ ``vocab.json``):
:meth:`CellTower.save_pretrained` / :meth:`CellTower.from_pretrained` (the base: :mod:`scmm.model.pretrained`).
scGPT checkpoint folders load through :func:`scmm.model.scgpt.tower_from_scgpt`. This module never imports scgpt.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError
from scmm.model.pretrained import PretrainedModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "vocab.json"

PathLike = str | os.PathLike
GROUP_WASTE = 0.05  # inference: the share of a group's tokens that may be padding (BENCHMARKS.md, "Cell tower")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class CellTowerConfig:
    """Architecture of the cell tower (scGPT ``TransformerModel`` encoder).

    ``vocab_size`` and ``pad_token_id`` come from the gene vocabulary and ``pad_value`` from the model's cell
    encoding when a stage-1 model builds its tower (0 / None here means "not set yet").
    """

    vocab_size: int = 0
    pad_token_id: int | None = None
    d_model: int = 512
    nhead: int = 8
    d_hid: int = 512
    nlayers: int = 12
    dropout: float = 0.2
    attn_dropout: float | None = None  # dropout on attention weights; None = `dropout` (as upstream scGPT)
    pad_value: float = -2.0  # the padding value: the category value encoder's padding row
    input_emb_style: str = "continuous"
    n_input_bins: int = 51
    pre_norm: bool = False
    max_value: float = 512
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        for name in ("d_model", "nhead", "d_hid", "nlayers", "n_input_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.d_model % self.nhead != 0:
            problems.append(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        if self.vocab_size and (not isinstance(self.pad_token_id, int)
                                or not 0 <= self.pad_token_id < self.vocab_size):
            problems.append(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attn_dropout is not None and not 0.0 <= float(self.attn_dropout) < 1.0:
            problems.append(f"attn_dropout must be in [0, 1), got {self.attn_dropout!r}")
        if self.input_emb_style not in ("continuous", "category"):
            problems.append(f"input_emb_style must be 'continuous' or 'category', got {self.input_emb_style!r}")
        if problems:
            raise ValueError("invalid cell tower config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm (upstream ``GeneEncoder``)."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int, eps: float = 1e-5):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return self.norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Scalar expression value -> vector via a 2-layer MLP (upstream ``ContinuousValueEncoder``)."""

    def __init__(self, d_model: int, dropout: float, max_value: float, eps: float = 1e-5):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: Tensor) -> Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value).to(self.linear1.weight.dtype)
        x = self.linear2(F.relu(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """Binned expression value -> embedding + LayerNorm (upstream ``CategoryValueEncoder``)."""

    def __init__(self, n_bins: int, d_model: int, padding_idx: int | None, eps: float = 1e-5):
        super().__init__()
        self.n_bins = n_bins
        self.embedding = nn.Embedding(n_bins, d_model, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, values: Tensor) -> Tensor:
        bins = values.long()
        if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= self.n_bins):
            raise ValueError(
                f"category value encoder expects bin indices in [0, {self.n_bins}), got values in "
                f"[{int(bins.min())}, {int(bins.max())}] (pad_value/mask_value must be valid bins in this style)"
            )
        return self.norm(self.embedding(bins))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout.

    ``in_proj_weight`` is ``[3 * d_model, d_model]`` = (q; k; v), each split into heads head-major,
    which is also the layout of flash-attention's ``Wqkv``.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """x: ``[B, L, d]``; key_mask: bool ``[B, 1, 1, L]``, True where a key may be attended to."""
        batch, length, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.nhead, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(batch, length, self.d_model)
        return self.out_proj(out)


class CellTowerLayer(nn.Module):
    """One encoder layer: self-attention + ReLU feed-forward, residual blocks with LayerNorm.

    Post-norm (default) equals ``nn.TransformerEncoderLayer(d, nhead, d_hid, dropout, batch_first=True)``.
    Pre-norm follows scGPT's ``FlashTransformerEncoderLayer(norm_scheme="pre")`` -- the only way
    upstream trains with ``pre_norm`` -- where the normalised stream also carries the residual.
    """

    def __init__(self, config: CellTowerConfig):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.pre_norm = config.pre_norm
        attn_dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.self_attn = SelfAttention(d, config.nhead, attn_dropout)
        self.linear1 = nn.Linear(d, config.d_hid)
        self.linear2 = nn.Linear(config.d_hid, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(config.dropout)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = self.norm1(x)
            x = x + self.dropout1(self.self_attn(x, key_mask))
            x = self.norm2(x)
            return x + self.dropout2(self._ff(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, key_mask)))
        return self.norm2(x + self.dropout2(self._ff(x)))


class CellTower(PretrainedModel, nn.Module):
    """scGPT-compatible expression transformer.

    ``forward(gene_ids, values, padding_mask)`` -> ``[B, L, d_model]`` per-gene hidden states;
    ``cell_embedding(...)`` -> ``[B, d_model]`` (the ``<cls>`` position, index 0). A folder of its own
    (``save_pretrained`` / ``from_pretrained``, :mod:`scmm.model.pretrained`): format ``scmm-cell-tower``.
    """

    folder_format = "scmm-cell-tower"

    def __init__(self, config: CellTowerConfig):
        super().__init__()
        if not config.vocab_size or config.pad_token_id is None:
            raise ValueError("the cell tower config needs vocab_size and pad_token_id (from the gene vocabulary)")
        self.config = config
        eps = config.layer_norm_eps
        self.gene_encoder = GeneEncoder(config.vocab_size, config.d_model, config.pad_token_id, eps)
        if config.input_emb_style == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEncoder(
                config.d_model, config.dropout, config.max_value, eps
            )
        else:
            self.value_encoder = CategoryValueEncoder(
                config.n_input_bins, config.d_model, _category_padding_idx(config), eps
            )
        self.layers = nn.ModuleList(CellTowerLayer(config) for _ in range(config.nlayers))
        self.gradient_checkpointing = False
        self._init_weights()

    # -- setup -------------------------------------------------------------------------------------

    def _init_weights(self) -> None:
        # upstream init_weights: uniform(-0.1, 0.1) gene embeddings; everything else torch defaults
        with torch.no_grad():
            self.gene_encoder.embedding.weight.uniform_(-0.1, 0.1)
            self.gene_encoder.embedding.weight[self.config.pad_token_id].zero_()

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def d_model(self) -> int:
        return self.config.d_model

    # -- forward -----------------------------------------------------------------------------------

    def embed(self, gene_ids: Tensor, values: Tensor) -> Tensor:
        """Input embeddings (gene + value), ``[B, L, d_model]``, before the encoder layers."""
        return self.gene_encoder(gene_ids) + self.value_encoder(values)

    def forward(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Per-gene hidden states.

        Args:
            gene_ids: ``LongTensor[B, L]`` vocabulary ids, ``<cls>`` first.
            values: ``FloatTensor[B, L]`` expression values (bin indices for ``"category"``).
            padding_mask: ``BoolTensor[B, L]``, True at padding; None means no padding.

        Returns:
            ``[B, L, d_model]``; zeros at padded positions.
        """
        if gene_ids.dim() != 2 or values.shape != gene_ids.shape:
            raise ValueError(
                f"gene_ids and values must both be [B, L]; got {tuple(gene_ids.shape)} and {tuple(values.shape)}"
            )
        if padding_mask is None:
            padding_mask = torch.zeros_like(gene_ids, dtype=torch.bool)
        elif padding_mask.shape != gene_ids.shape:
            raise ValueError(
                f"padding_mask must be [B, L] like gene_ids; got {tuple(padding_mask.shape)} vs {tuple(gene_ids.shape)}"
            )
        padding_mask = padding_mask.to(device=gene_ids.device, dtype=torch.bool)
        if not torch.is_grad_enabled() and bool(padding_mask.any()):
            return self._encode_by_length(gene_ids, values, padding_mask)

        # Columns that are padding in every row are dropped: the encoder has no positional
        # encoding, so this is exact and spares all compute on them.
        keep = ~padding_mask.all(dim=0)
        if bool(keep.all()):
            return self._encode(gene_ids, values, padding_mask)
        batch, length = gene_ids.shape
        cols = keep.nonzero().squeeze(1)
        if cols.numel() == 0:  # nothing but padding (the encoder ends in LayerNorm: parameter dtype)
            weight = self.gene_encoder.embedding.weight
            return torch.zeros((batch, length, self.config.d_model), dtype=weight.dtype, device=gene_ids.device)
        hidden = self._encode(gene_ids[:, cols], values[:, cols], padding_mask[:, cols])
        out = hidden.new_zeros((batch, length, hidden.shape[-1]))
        out[:, cols] = hidden
        return out

    def _encode_by_length(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        """Inference without work on padding: each row's genes first (in their order), then groups of rows of
        similar length, each trimmed to its longest row; the states go back to the genes' positions."""
        batch, length = gene_ids.shape
        order = torch.argsort(padding_mask.to(torch.int8), dim=1, stable=True)
        gene_ids, values = gene_ids.gather(1, order), values.gather(1, order)
        lengths = (~padding_mask).sum(1)
        out: Tensor | None = None
        for rows in length_groups(lengths, GROUP_WASTE):
            width = max(int(lengths[rows[0]]), 1)
            pad = torch.arange(width, device=gene_ids.device)[None, :] >= lengths[rows, None]
            hidden = self._encode(gene_ids[rows, :width], values[rows, :width], pad)
            if out is None:
                out = hidden.new_zeros((batch, length, hidden.shape[-1]))
            out[rows[:, None], order[rows, :width]] = hidden
        assert out is not None
        return out

    def _encode(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        x = self.embed(gene_ids, values)
        key_mask: Tensor | None = None
        if bool(padding_mask.any()):
            # rows that are entirely padding attend to everything (finite garbage, zeroed below)
            empty_rows = padding_mask.all(dim=1, keepdim=True)
            key_mask = (~padding_mask | empty_rows)[:, None, None, :]
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
        if key_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return x

    def cell_embedding(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Cell embedding ``[B, d_model]``: the hidden state at position 0 (``<cls>``)."""
        return self.forward(gene_ids, values, padding_mask)[:, 0]

    # -- native checkpoints ------------------------------------------------------------------------

    def _write(self, tmp: Path, vocab: GeneVocab | Mapping[str, int] | None = None,
               from_parent: tuple[str, ...] = ()) -> None:
        """``config.json`` + ``model.safetensors`` (+ ``vocab.json`` when given). Config keys named in
        ``from_parent`` are left out: the enclosing folder owns them (a stage-1 folder's cell encoding owns
        ``pad_value``) and passes them back to :meth:`from_pretrained`."""
        self.save_weights(tmp / WEIGHTS_NAME, self.weights_of(self))
        if vocab is not None:
            tokens = vocab.token_to_id if isinstance(vocab, GeneVocab) else dict(vocab)
            (tmp / VOCAB_NAME).write_text(json.dumps(tokens) + "\n")
        self.write_config(tmp, exclude=from_parent, **({"from_parent": list(from_parent)} if from_parent else {}))

    @classmethod
    def _from_folder(cls, folder: Path, raw: dict, version: int, map_location: str | torch.device = "cpu",
                     **parent: Any) -> CellTower:
        """Build the tower of a folder (strict: every key must match); ``parent`` supplies the config keys that
        the folder leaves to its enclosing folder."""
        owed = raw.pop("from_parent", [])
        missing = [k for k in owed if k not in parent]
        if missing:
            raise ScmmError(f"the cell tower {folder} takes {', '.join(missing)} from the model folder around it; "
                            f"open that folder instead")
        model = cls(cls.read_config(CellTowerConfig, folder, {**raw, **{k: parent[k] for k in owed}}))
        load_state_dict_strict(model, cls.load_weights(folder / WEIGHTS_NAME), what=str(folder / WEIGHTS_NAME))
        return model.to(map_location)


def length_groups(lengths: Tensor, max_waste: float) -> list[Tensor]:
    """Row indices grouped by length, longest first: each group holds rows of similar length, so that padding
    them to the group's longest row wastes at most ``max_waste`` of the group's tokens."""
    order = torch.argsort(lengths, descending=True, stable=True)
    sizes = lengths[order].tolist()
    groups, start = [], 0
    while start < len(sizes):
        end, total = start + 1, sizes[start]
        while end < len(sizes) and (total + sizes[end]) >= (1 - max_waste) * sizes[start] * (end - start + 1):
            total += sizes[end]
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def _category_padding_idx(config: CellTowerConfig) -> int | None:
    # upstream: Embedding(n_input_bins, d, padding_idx=pad_value); negative indices count from the end
    pad = config.pad_value
    if float(pad).is_integer() and -config.n_input_bins <= int(pad) < config.n_input_bins:
        return int(pad)
    return None


def check_shapes(model: nn.Module, state: Mapping[str, Tensor], origin: Any) -> None:
    """Raise ``ValueError`` naming every key of ``state`` whose shape differs from the model's."""
    own = model.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ValueError(f"shape mismatch loading {origin}: " + "; ".join(bad))


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], what: str = "state dict") -> None:
    """``load_state_dict`` that raises ``ValueError`` naming missing/unexpected/mis-shaped keys."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if problems:
        raise ValueError(f"cannot load {what} into {type(model).__name__}: " + "; ".join(problems))
    check_shapes(model, state, what)
    model.load_state_dict(dict(state), strict=True)


__all__ = ["CellTowerConfig", "CellTower", "CellTowerLayer", "SelfAttention", "GeneEncoder", "ContinuousValueEncoder",
           "CategoryValueEncoder", "load_state_dict_strict", "check_shapes"]
