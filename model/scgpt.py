"""scGPT checkpoint folders (``args.json``, ``vocab.json``, ``best_model.pt``) -> scmm's cell tower and decoder.

Upstream ``TransformerModel`` names are mapped onto :class:`~scmm.model.cell_tower.CellTower` and
:class:`~scmm.model.expr_decoder.ExprDecoder` names; flash-attention checkpoints (``self_attn.Wqkv.*``) load like
``in_proj_*`` ones (the same packed q/k/v layout). Unlike upstream ``load_pretrained``, keys that do not match are
errors unless explicitly allowed. ``vocab.json`` gets upstream's treatment: missing ``<pad>``, ``<cls>``,
``<eoc>`` are appended after the largest id. The value encoding the checkpoint was trained with (pad and mask
values, bins) is returned beside the weights, for the model's :class:`~scmm.data_pipeline.encoding.CellEncoding`
to be checked against. This module never imports scgpt.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scmm.data_pipeline.vocab import SPECIAL_TOKENS, GeneVocab
from scmm.model.cell_tower import CellTower, CellTowerConfig, PathLike, check_shapes, load_state_dict_strict
from scmm.model.expr_decoder import ExprDecoder, ExprDecoderConfig
from scmm.model.pretrained import config_from_dict, config_to_dict

logger = logging.getLogger(__name__)

SCGPT_ARGS_NAME = "args.json"
SCGPT_VOCAB_NAME = "vocab.json"
SCGPT_WEIGHTS_NAME = "best_model.pt"

#: Special tokens of scGPT vocabularies, in the order upstream appends them when missing (the rule is applied by
#: :class:`~scmm.data_pipeline.vocab.GeneVocab`, the one reader of vocab.json).
SCGPT_SPECIAL_TOKENS = SPECIAL_TOKENS

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

__all__ = ["ScGPTCheckpoint", "load_scgpt_state", "map_scgpt_key", "tower_from_scgpt", "decoder_from_scgpt",
           "SCGPT_HEAD_PREFIXES", "SCGPT_SPECIAL_TOKENS"]




@dataclass
class ScGPTCheckpoint:
    """An scGPT checkpoint folder, read and remapped.

    ``tower_state`` uses :class:`CellTower` names; ``decoder_state`` uses ``ExprDecoder`` names (the
    ``decoder.`` prefix stripped); ``head_state`` holds other known upstream heads under their upstream
    names; ``unknown_state`` holds keys that belong to nothing known (upstream names).
    """

    config: CellTowerConfig
    vocab: dict[str, int]
    args: dict[str, Any]
    tower_state: dict[str, Tensor] = field(default_factory=dict)
    decoder_state: dict[str, Tensor] = field(default_factory=dict)
    head_state: dict[str, Tensor] = field(default_factory=dict)
    unknown_state: dict[str, Tensor] = field(default_factory=dict)
    flash_attention: bool = False

    @property
    def encoding(self) -> dict[str, float]:
        """The value encoding the checkpoint was trained with, as far as args.json says (pad and mask values,
        value bins)."""
        out = {"pad_value": float(self.config.pad_value)}
        mask, bins = _first(self.args, "mask_value"), _first(self.args, "n_bins")
        if mask is not None:
            out["mask_value"] = float(mask)
        if bins is not None:
            out["n_bins"] = int(bins)
        return out


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


def map_scgpt_key(key: str) -> tuple[str, str | None]:
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


def _upstream_names(tower_keys: list[str]) -> list[str]:
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
    """JSON of a checkpoint file; a missing one is a FileNotFoundError naming what it should hold."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"scGPT checkpoint folder {path.parent} has no {what} ({path.name})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _load_vocab(source: Mapping[str, int] | PathLike) -> dict[str, int]:
    """The checkpoint's vocabulary through the one reader of vocab.json (specials appended as upstream does)."""
    if isinstance(source, Mapping):
        return GeneVocab.from_mapping(dict(source), origin="vocab mapping").token_to_id
    return GeneVocab.load(source).token_to_id


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
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


def _config_from_scgpt(args: Mapping[str, Any], tower_state: Mapping[str, Tensor], vocab: dict[str, int],
                       folder: Path) -> CellTowerConfig:
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
    nlayers = pick("nlayers", _first(args, "nlayers", "n_layers", "num_layers"),
                   (max(layer_ids) + 1) if layer_ids else None)
    lin1 = tower_state.get("layers.0.linear1.weight")
    d_hid = pick("d_hid", _first(args, "d_hid", "dim_feedforward", "ffn_dim"),
                 lin1.shape[0] if lin1 is not None else None)
    nhead = _first(args, "nheads", "nhead", "n_heads", "num_heads")
    if nhead is None:
        raise ValueError(f"{folder / SCGPT_ARGS_NAME} does not give the number of attention heads (nheads)")

    has_category = "value_encoder.embedding.weight" in tower_state
    has_continuous = "value_encoder.linear1.weight" in tower_state
    style = _first(args, "input_emb_style")
    if style is None:
        style = "category" if has_category else "continuous"
    if style not in ("continuous", "category"):
        raise ValueError(f"{folder / SCGPT_ARGS_NAME}: input_emb_style {style!r} is not supported "
                         f"(continuous, category)")
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
    return CellTowerConfig(
        vocab_size=int(vocab_size),
        pad_token_id=int(vocab[pad_token]),
        d_model=int(d_model),
        nhead=int(nhead),
        d_hid=int(d_hid),
        nlayers=int(nlayers),
        dropout=float(_first(args, "dropout") if _first(args, "dropout") is not None else 0.2),
        pad_value=float(pad_value if pad_value is not None else -2.0),
        input_emb_style=style,
        n_input_bins=n_input_bins,
        pre_norm=bool(_first(args, "pre_norm") or False),
    )


def load_scgpt_state(folder: PathLike, vocab: Mapping[str, int] | PathLike | None = None) -> ScGPTCheckpoint:
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


def tower_from_scgpt(
    folder: PathLike,
    strict: bool = True,
    allow_missing_heads: bool = False,
    vocab: Mapping[str, int] | PathLike | None = None,
    checkpoint: ScGPTCheckpoint | None = None,
    **config_overrides: Any,
) -> tuple[CellTower, dict[str, int]]:
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
        checkpoint: the folder as :func:`load_scgpt_state` already read it (saves reading it twice).
        config_overrides: fields of :class:`CellTowerConfig` to override (e.g. ``dropout=0.1``);
            architecture fields that disagree with the weights fail on load.

    Returns:
        ``(model, vocab)`` with vocab a ``{symbol: id}`` dict.
    """
    ckpt = checkpoint if checkpoint is not None else load_scgpt_state(folder, vocab=vocab)
    config = ckpt.config
    if config_overrides:
        config = config_from_dict(CellTowerConfig, {**config_to_dict(config), **config_overrides})
    model = CellTower(config)

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

    check_shapes(model, tower_state, folder)
    present = {k: v for k, v in tower_state.items() if k in expected}
    model.load_state_dict(present, strict=False)
    return model, dict(ckpt.vocab)


def decoder_from_scgpt_state(decoder_state: Mapping[str, Tensor], origin: str = "scGPT decoder state") -> ExprDecoder:
    """An expression decoder from an scGPT ``decoder.*`` state with the prefix already stripped."""
    if "fc.0.weight" not in decoder_state or "fc.4.weight" not in decoder_state:
        raise ValueError(f"{origin} has no expression decoder (decoder.fc.*)")
    d_model, d_in = decoder_state["fc.0.weight"].shape
    config = ExprDecoderConfig(d_model=int(d_model), d_in=int(d_in),
                               explicit_zero_prob=any(k.startswith("zero_logit.") for k in decoder_state))
    model = ExprDecoder(config)
    load_state_dict_strict(model, decoder_state, what=origin)
    return model


def decoder_from_scgpt(folder: PathLike) -> ExprDecoder:
    """The ``decoder.*`` weights of an scGPT checkpoint folder (all of them must match)."""
    ckpt = load_scgpt_state(folder)
    if not ckpt.decoder_state:
        raise ValueError(f"scGPT checkpoint {folder} has no decoder.* weights")
    return decoder_from_scgpt_state(ckpt.decoder_state, origin=f"decoder.* of {folder}")
