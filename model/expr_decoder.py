"""Expression decoder: per-gene hidden state -> expression value (scGPT ``ExprDecoder``).

Used for masked expression reconstruction in stage 1 and to decode pseudo-cells in stage 2.
``forward(hidden[B, L, d_in]) -> pred[B, L]``. The MLP is ``Linear(d_in, d) -> LeakyReLU ->
Linear(d, d) -> LeakyReLU -> Linear(d, 1)`` stored as ``fc.0``/``fc.2``/``fc.4`` exactly as upstream, so
an scGPT checkpoint's ``decoder.*`` keys load after stripping the prefix
(:func:`scmm.model.scgpt.decoder_from_scgpt`). Upstream's optional
``explicit_zero_prob`` branch (``zero_logit.*``) is supported too.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scmm.atomic import write_folder
from scmm.model.cell_tower import CONFIG_NAME, WEIGHTS_NAME, PathLike, load_state_dict_strict

logger = logging.getLogger(__name__)


@dataclass
class ExprDecoderConfig:
    d_model: int = 512
    d_in: int | None = None  # input width; None -> d_model (upstream doubles it with batch labels)
    explicit_zero_prob: bool = False

    def __post_init__(self) -> None:
        if self.d_in is None:
            self.d_in = self.d_model
        for name in ("d_model", "d_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"invalid ExprDecoderConfig: {name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExprDecoderConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ExprDecoderConfig keys: {', '.join(unknown)}")
        return cls(**dict(data))


def _mlp(d_in: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, 1),
    )


class ExprDecoder(nn.Module):
    """scGPT-style expression decoder: ``[B, L, d_in] -> [B, L]``."""

    def __init__(self, config: ExprDecoderConfig | int, explicit_zero_prob: bool = False):
        super().__init__()
        if isinstance(config, int):
            config = ExprDecoderConfig(d_model=config, explicit_zero_prob=explicit_zero_prob)
        self.config = config
        self.fc = _mlp(config.d_in, config.d_model)
        self.zero_logit = _mlp(config.d_in, config.d_model) if config.explicit_zero_prob else None

    def forward(self, hidden: Tensor, return_zero_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Predicted expression per position, ``[B, L]``.

        With ``return_zero_probs=True`` (needs ``explicit_zero_prob``), returns ``(pred, zero_probs)``.
        """
        pred = self.fc(hidden).squeeze(-1)
        if not return_zero_probs:
            return pred
        if self.zero_logit is None:
            raise ValueError("this ExprDecoder has no zero-probability head (explicit_zero_prob=False)")
        return pred, torch.sigmoid(self.zero_logit(hidden).squeeze(-1))

    # -- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, folder: PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

        return write_folder(folder, write, marker=CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, folder: PathLike, map_location: str | torch.device = "cpu") -> ExprDecoder:
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not an expression decoder folder: missing {name}")
        model = cls(ExprDecoderConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text())))
        load_state_dict_strict(model, load_file(str(folder / WEIGHTS_NAME), device="cpu"), what=str(folder))
        return model.to(map_location)


__all__ = ["ExprDecoder", "ExprDecoderConfig"]
