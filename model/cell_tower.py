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
so padded genes are never attended to. Columns that are padding in every row of a batch are dropped
before the encoder (exact, since there is no positional encoding) and hidden states at padded
positions are returned as zeros.

Loading scGPT checkpoint folders (``args.json``, ``vocab.json``, ``best_model.pt``) goes through
:func:`load_scgpt_state` / :meth:`CellTower.from_scgpt`; unlike upstream ``load_pretrained``, keys
that do not match are errors unless explicitly allowed. Native checkpoints are ``config.json`` +
``model.safetensors`` (:meth:`CellTower.save_pretrained` / :meth:`CellTower.from_pretrained`).
This module never imports scgpt.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scmm.atomic import temp_dir_beside

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SCGPT_ARGS_NAME = "args.json"
SCGPT_VOCAB_NAME = "vocab.json"
SCGPT_WEIGHTS_NAME = "best_model.pt"

#: Special tokens of scGPT vocabularies, in the order upstream appends them when missing.
SCGPT_SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")

#: Prefixes of upstream ``TransformerModel`` submodules that the tower does not use.
#: ``decoder.`` is the expression decoder (see ``model/expr_decoder.py``). ``dsbn.``/``bn.`` and
#: ``batch_encoder.`` belong to upstream's batch-label options; ignoring them changes the input path
#: of models trained with them, which is logged when it happens.
SCGPT_HEAD_PREFIXES = (
    "decoder.",
    "cls_decoder.",
    "mvc_decoder.",
    "grad_reverse_discriminator.",
    "dsbn.",
    "bn.",
    "batch_encoder.",
)
_INPUT_PATH_HEADS = ("dsbn.", "bn.", "batch_encoder.")

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class CellTowerConfig:
    """Architecture of the cell tower (scGPT ``TransformerModel`` encoder)."""

    vocab_size: int
    pad_token_id: int
    d_model: int = 512
    nhead: int = 8
    d_hid: int = 512
    nlayers: int = 12
    dropout: float = 0.2
    attn_dropout: Optional[float] = None  # dropout on attention weights; None = `dropout` (as upstream scGPT)
    pad_value: float = -2.0
    mask_value: float = -1.0
    input_emb_style: str = "continuous"
    n_input_bins: int = 51
    pre_norm: bool = False
    max_value: float = 512
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "d_model", "nhead", "d_hid", "nlayers", "n_input_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.d_model % self.nhead != 0:
            problems.append(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < max(int(self.vocab_size), 1):
            problems.append(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.input_emb_style not in ("continuous", "category"):
            problems.append(f"input_emb_style must be 'continuous' or 'category', got {self.input_emb_style!r}")
        if problems:
            raise ValueError("invalid CellTowerConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CellTowerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CellTowerConfig keys: {', '.join(unknown)}")
        return cls(**dict(data))

    def save(self, path: PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: PathLike) -> "CellTowerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


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

    def __init__(self, n_bins: int, d_model: int, padding_idx: Optional[int], eps: float = 1e-5):
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

    def forward(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
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

    def forward(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        if self.pre_norm:
            x = self.norm1(x)
            x = x + self.dropout1(self.self_attn(x, key_mask))
            x = self.norm2(x)
            return x + self.dropout2(self._ff(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, key_mask)))
        return self.norm2(x + self.dropout2(self._ff(x)))


class CellTower(nn.Module):
    """scGPT-compatible expression transformer.

    ``forward(gene_ids, values, padding_mask)`` -> ``[B, L, d_model]`` per-gene hidden states;
    ``cell_embedding(...)`` -> ``[B, d_model]`` (the ``<cls>`` position, index 0).
    """

    config_class = CellTowerConfig

    def __init__(self, config: CellTowerConfig):
        super().__init__()
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

    def forward(self, gene_ids: Tensor, values: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
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

    def _encode(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        x = self.embed(gene_ids, values)
        key_mask: Optional[Tensor] = None
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

    def cell_embedding(self, gene_ids: Tensor, values: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Cell embedding ``[B, d_model]``: the hidden state at position 0 (``<cls>``)."""
        return self.forward(gene_ids, values, padding_mask)[:, 0]

    # -- native checkpoints ------------------------------------------------------------------------

    def save_pretrained(self, folder: PathLike, vocab: Optional[Mapping[str, int]] = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (and ``vocab.json`` if given), atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        config = self.config.to_dict()

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if vocab is not None:
                (tmp / SCGPT_VOCAB_NAME).write_text(json.dumps(dict(vocab)) + "\n")
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        return atomic_write_folder(folder, write)

    @classmethod
    def from_pretrained(cls, folder: PathLike, map_location: Union[str, torch.device] = "cpu") -> "CellTower":
        """Load a folder written by :meth:`save_pretrained` (strict: every key must match)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a cell tower folder: missing {name}")
        config = CellTowerConfig.load(folder / CONFIG_NAME)
        model = cls(config)
        state = load_file(str(folder / WEIGHTS_NAME), device="cpu")
        load_state_dict_strict(model, state, what=str(folder / WEIGHTS_NAME))
        return model.to(map_location)

    # -- scGPT checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_scgpt(
        cls,
        folder: PathLike,
        strict: bool = True,
        allow_missing_heads: bool = False,
        vocab: Optional[Union[Mapping[str, int], PathLike]] = None,
        **config_overrides: Any,
    ) -> Tuple["CellTower", Dict[str, int]]:
        """Build a tower from an scGPT checkpoint folder (``args.json``, ``vocab.json``, ``best_model.pt``).

        Args:
            folder: the scGPT checkpoint folder.
            strict: raise ``ValueError`` naming any key that is unexpected or missing. With
                ``strict=False`` unmatched keys are logged and skipped (shape mismatches always raise).
            allow_missing_heads: with ``strict``, tolerate keys of known upstream heads
                (:data:`SCGPT_HEAD_PREFIXES`, e.g. ``decoder.``, ``cls_decoder.``, ``mvc_decoder.``); they
                are logged. Real scGPT checkpoints always carry such heads.
            vocab: a vocabulary (symbol -> id mapping, or path to a JSON file) to use instead of the
                folder's ``vocab.json``.
            config_overrides: fields of :class:`CellTowerConfig` to override (e.g. ``dropout=0.1``);
                architecture fields that disagree with the weights fail on load.

        Returns:
            ``(model, vocab)`` with vocab a ``{symbol: id}`` dict.
        """
        ckpt = load_scgpt_state(folder, vocab=vocab)
        config = ckpt.config
        if config_overrides:
            config = CellTowerConfig.from_dict({**config.to_dict(), **config_overrides})
        model = cls(config)

        expected = set(model.state_dict())
        tower_state = ckpt.tower_state
        missing = sorted(expected - set(tower_state))
        heads = dict(ckpt.head_state)
        heads.update({"decoder." + k: v for k, v in ckpt.decoder_state.items()})
        unknown = sorted(ckpt.unknown_state)
        if strict:
            problems = []
            if unknown:
                problems.append(f"unexpected keys: {', '.join(unknown)}")
            if heads and not allow_missing_heads:
                problems.append(
                    f"unexpected keys of scGPT heads not used by the tower: {', '.join(sorted(heads))} "
                    "(pass allow_missing_heads=True to ignore them)"
                )
            if missing:
                problems.append(f"missing keys: {', '.join(_upstream_names(missing))}")
            if problems:
                raise ValueError(f"cannot load scGPT checkpoint {folder} into CellTower: " + "; ".join(problems))
        else:
            if unknown:
                logger.warning("ignoring unexpected keys in %s: %s", folder, ", ".join(unknown))
            if missing:
                logger.warning("keys missing from %s (left at init): %s", folder, ", ".join(_upstream_names(missing)))
        if heads:
            prefixes = sorted({_head_prefix(k) for k in heads})
            logger.info("scGPT checkpoint %s: ignoring head weights %s", folder, ", ".join(p + "*" for p in prefixes))
            used_input_heads = [p for p in prefixes if p in _INPUT_PATH_HEADS]
            if used_input_heads:
                logger.warning(
                    "scGPT checkpoint %s was trained with %s on the input path; the tower does not apply them, "
                    "so its outputs differ from upstream's for this checkpoint",
                    folder,
                    ", ".join(used_input_heads),
                )

        _check_shapes(model, tower_state, folder)
        present = {k: v for k, v in tower_state.items() if k in expected}
        model.load_state_dict(present, strict=False)
        return model, dict(ckpt.vocab)


def _category_padding_idx(config: CellTowerConfig) -> Optional[int]:
    # upstream: Embedding(n_input_bins, d, padding_idx=pad_value); negative indices count from the end
    pad = config.pad_value
    if float(pad).is_integer() and -config.n_input_bins <= int(pad) < config.n_input_bins:
        return int(pad)
    return None


# --------------------------------------------------------------------------------------------------
# scGPT checkpoint reading and key mapping
# --------------------------------------------------------------------------------------------------


@dataclass
class ScGPTCheckpoint:
    """An scGPT checkpoint folder, read and remapped.

    ``tower_state`` uses :class:`CellTower` names; ``decoder_state`` uses ``ExprDecoder`` names (the
    ``decoder.`` prefix stripped); ``head_state`` holds other known upstream heads under their upstream
    names; ``unknown_state`` holds keys that belong to nothing known (upstream names).
    """

    config: CellTowerConfig
    vocab: Dict[str, int]
    args: Dict[str, Any]
    tower_state: Dict[str, Tensor] = field(default_factory=dict)
    decoder_state: Dict[str, Tensor] = field(default_factory=dict)
    head_state: Dict[str, Tensor] = field(default_factory=dict)
    unknown_state: Dict[str, Tensor] = field(default_factory=dict)
    flash_attention: bool = False


_LAYER_RE = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
}
_FLASH_RENAMES = {"self_attn.Wqkv.weight": "self_attn.in_proj_weight", "self_attn.Wqkv.bias": "self_attn.in_proj_bias"}
_EMBED_RENAMES = {
    "encoder.embedding.weight": "gene_encoder.embedding.weight",
    "encoder.enc_norm.weight": "gene_encoder.norm.weight",
    "encoder.enc_norm.bias": "gene_encoder.norm.bias",
    # continuous value encoder
    "value_encoder.linear1.weight": "value_encoder.linear1.weight",
    "value_encoder.linear1.bias": "value_encoder.linear1.bias",
    "value_encoder.linear2.weight": "value_encoder.linear2.weight",
    "value_encoder.linear2.bias": "value_encoder.linear2.bias",
    "value_encoder.norm.weight": "value_encoder.norm.weight",
    "value_encoder.norm.bias": "value_encoder.norm.bias",
    # category value encoder
    "value_encoder.embedding.weight": "value_encoder.embedding.weight",
    "value_encoder.enc_norm.weight": "value_encoder.norm.weight",
    "value_encoder.enc_norm.bias": "value_encoder.norm.bias",
}
_INVERSE_RENAMES = {v: k for k, v in _EMBED_RENAMES.items()}


def map_scgpt_key(key: str) -> Tuple[str, Optional[str]]:
    """Classify one upstream state-dict key: ``(kind, new_name)``.

    kind is ``"tower"`` (new_name in CellTower), ``"decoder"`` (new_name in ExprDecoder), ``"head"``
    (a known unused head; new_name None) or ``"unknown"``.
    """
    if key in _EMBED_RENAMES:
        return "tower", _EMBED_RENAMES[key]
    match = _LAYER_RE.match(key)
    if match:
        index, rest = match.groups()
        rest = _FLASH_RENAMES.get(rest, rest)
        if rest in _LAYER_KEYS:
            return "tower", f"layers.{index}.{rest}"
        return "unknown", None
    if key.startswith("decoder."):
        return "decoder", key[len("decoder.") :]
    if any(key.startswith(p) for p in SCGPT_HEAD_PREFIXES):
        return "head", None
    return "unknown", None


def _upstream_names(tower_keys: List[str]) -> List[str]:
    """Tower key names as they would appear upstream (for error messages)."""
    out = []
    for key in tower_keys:
        if key in _INVERSE_RENAMES:
            out.append(_INVERSE_RENAMES[key])
        elif key.startswith("layers."):
            out.append("transformer_encoder." + key)
        else:
            out.append(key)
    return out


def _head_prefix(key: str) -> str:
    return next((p for p in SCGPT_HEAD_PREFIXES if key.startswith(p)), key.split(".", 1)[0] + ".")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"scGPT checkpoint folder {path.parent} has no {what} ({path.name})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _load_vocab(source: Union[Mapping[str, int], PathLike]) -> Dict[str, int]:
    if isinstance(source, Mapping):
        data = dict(source)
        origin = "vocab mapping"
    else:
        data = _read_json(Path(source), "vocabulary")
        origin = str(source)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
        raise ValueError(f"{origin} must map gene symbols to integer ids")
    return data


def _unwrap_state_dict(obj: Any, path: Path) -> Dict[str, Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("model_state_dict", "state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _first(args: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in args and args[name] is not None:
            return args[name]
    return None


def _config_from_scgpt(args: Mapping[str, Any], tower_state: Mapping[str, Tensor], vocab: Dict[str, int], folder: Path) -> CellTowerConfig:
    """Architecture from args.json, cross-checked with (and completed by) the weight shapes."""
    emb = tower_state.get("gene_encoder.embedding.weight")
    if emb is None:
        raise ValueError(f"{folder / SCGPT_WEIGHTS_NAME} has no gene embedding (encoder.embedding.weight)")
    vocab_size, d_from_weights = emb.shape
    conflicts = []

    def pick(name: str, from_args: Any, from_weights: Any) -> Any:
        if from_args is not None and from_weights is not None and int(from_args) != int(from_weights):
            conflicts.append(f"{name}: args.json says {from_args}, weights say {from_weights}")
        return from_weights if from_weights is not None else from_args

    d_model = pick("d_model", _first(args, "embsize", "d_model", "emsize", "layer_size"), d_from_weights)
    layer_ids = {int(k.split(".")[1]) for k in tower_state if k.startswith("layers.")}
    nlayers = pick("nlayers", _first(args, "nlayers", "n_layers", "num_layers"), (max(layer_ids) + 1) if layer_ids else None)
    lin1 = tower_state.get("layers.0.linear1.weight")
    d_hid = pick("d_hid", _first(args, "d_hid", "dim_feedforward", "ffn_dim"), lin1.shape[0] if lin1 is not None else None)
    nhead = _first(args, "nheads", "nhead", "n_heads", "num_heads")
    if nhead is None:
        raise ValueError(f"{folder / SCGPT_ARGS_NAME} does not give the number of attention heads (nheads)")

    has_category = "value_encoder.embedding.weight" in tower_state
    has_continuous = "value_encoder.linear1.weight" in tower_state
    style = _first(args, "input_emb_style")
    if style is None:
        style = "category" if has_category else "continuous"
    if style not in ("continuous", "category"):
        raise ValueError(f"{folder / SCGPT_ARGS_NAME}: input_emb_style {style!r} is not supported (continuous, category)")
    if (style == "category" and has_continuous) or (style == "continuous" and has_category):
        conflicts.append(f"input_emb_style: args.json says {style!r} but the value encoder weights are the other style")

    n_bins = _first(args, "n_input_bins", "n_bins")
    if has_category:
        n_input_bins = int(tower_state["value_encoder.embedding.weight"].shape[0])
    elif n_bins is not None:
        n_input_bins = int(n_bins)
    else:
        n_input_bins = 51

    pad_token = _first(args, "pad_token") or "<pad>"
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary of {folder}")
    if conflicts:
        raise ValueError(f"scGPT checkpoint {folder} is inconsistent: " + "; ".join(conflicts))

    pad_value = _first(args, "pad_value")
    mask_value = _first(args, "mask_value")
    return CellTowerConfig(
        vocab_size=int(vocab_size),
        pad_token_id=int(vocab[pad_token]),
        d_model=int(d_model),
        nhead=int(nhead),
        d_hid=int(d_hid),
        nlayers=int(nlayers),
        dropout=float(_first(args, "dropout") if _first(args, "dropout") is not None else 0.2),
        pad_value=float(pad_value if pad_value is not None else -2.0),
        mask_value=float(mask_value if mask_value is not None else -1.0),
        input_emb_style=style,
        n_input_bins=n_input_bins,
        pre_norm=bool(_first(args, "pre_norm") or False),
    )


def load_scgpt_state(folder: PathLike, vocab: Optional[Union[Mapping[str, int], PathLike]] = None) -> ScGPTCheckpoint:
    """Read an scGPT checkpoint folder and split its remapped state dict into tower/decoder/heads.

    ``vocab.json`` gets upstream's treatment: missing ``<pad>``, ``<cls>``, ``<eoc>`` are appended
    after the largest id. Flash-attention keys (``self_attn.Wqkv.*``) are renamed to ``in_proj_*``
    (the same packed q/k/v layout).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"scGPT checkpoint folder not found: {folder}")
    args = _read_json(folder / SCGPT_ARGS_NAME, "model arguments")
    if not isinstance(args, dict):
        raise ValueError(f"{folder / SCGPT_ARGS_NAME} must hold a JSON object")
    vocab_dict = _load_vocab(vocab if vocab is not None else folder / SCGPT_VOCAB_NAME)
    for token in SCGPT_SPECIAL_TOKENS:
        if token not in vocab_dict:
            vocab_dict[token] = max(vocab_dict.values(), default=-1) + 1

    weights = folder / SCGPT_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"scGPT checkpoint folder {folder} has no {SCGPT_WEIGHTS_NAME}")
    state = _unwrap_state_dict(torch.load(weights, map_location="cpu", weights_only=True), weights)

    ckpt = ScGPTCheckpoint(config=None, vocab=vocab_dict, args=args)  # type: ignore[arg-type]
    for key, value in state.items():
        kind, name = map_scgpt_key(key)
        if kind == "tower":
            if name in ckpt.tower_state:
                raise ValueError(f"{weights}: two keys map to {name} (in_proj and Wqkv both present?)")
            ckpt.tower_state[name] = value
            ckpt.flash_attention |= ".Wqkv." in key
        elif kind == "decoder":
            ckpt.decoder_state[name] = value
        elif kind == "head":
            ckpt.head_state[key] = value
        else:
            ckpt.unknown_state[key] = value
    ckpt.config = _config_from_scgpt(args, ckpt.tower_state, vocab_dict, folder)
    too_big = sorted((i, s) for s, i in vocab_dict.items() if not 0 <= i < ckpt.config.vocab_size)
    if too_big:
        examples = ", ".join(f"{s}={i}" for i, s in too_big[:5])
        raise ValueError(
            f"vocabulary of {folder} has {len(too_big)} ids outside the embedding table "
            f"(size {ckpt.config.vocab_size}), e.g. {examples}"
        )
    return ckpt


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by model/expr_decoder.py)
# --------------------------------------------------------------------------------------------------


def _check_shapes(model: nn.Module, state: Mapping[str, Tensor], origin: Any) -> None:
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
    _check_shapes(model, state, what)
    model.load_state_dict(dict(state), strict=True)


def atomic_write_folder(
    folder: PathLike, write: Callable[[Path], None], last: Tuple[str, ...] = (CONFIG_NAME,)
) -> Path:
    """Run ``write(tmp_dir)`` in a temp dir beside ``folder``, then move the result into place.

    A new folder appears in one rename. Into an existing folder the written files are moved one by
    one with ``os.replace`` (each atomic; the names in ``last`` -- the config -- land last), leaving
    other files there untouched. On failure nothing is left behind.
    """
    folder = Path(folder)
    tmp = temp_dir_beside(folder)
    try:
        write(tmp)
        if not folder.exists():
            try:
                os.rename(tmp, folder)
                return folder
            except OSError:
                if not folder.is_dir():
                    raise
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} exists and is not a directory")
        for path in sorted(tmp.iterdir(), key=lambda p: (p.name in last, p.name)):
            os.replace(path, folder / path.name)
        return folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "CellTowerConfig",
    "CellTower",
    "CellTowerLayer",
    "SelfAttention",
    "GeneEncoder",
    "ContinuousValueEncoder",
    "CategoryValueEncoder",
    "ScGPTCheckpoint",
    "load_scgpt_state",
    "map_scgpt_key",
    "load_state_dict_strict",
    "atomic_write_folder",
    "SCGPT_HEAD_PREFIXES",
]
