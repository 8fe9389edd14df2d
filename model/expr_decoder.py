"""Expression decoder: per-gene hidden state -> expression value (scGPT ``ExprDecoder``).

Used for masked expression reconstruction in stage 1 and to decode pseudo-cells in stage 2.
``forward(hidden[B, L, d_in]) -> pred[B, L]``. The MLP is ``Linear(d_in, d) -> LeakyReLU ->
Linear(d, d) -> LeakyReLU -> Linear(d, 1)`` stored as ``fc.0``/``fc.2``/``fc.4`` exactly as upstream, so
an scGPT checkpoint's ``decoder.*`` keys load after stripping the prefix
(:func:`scmm.model.scgpt.decoder_from_scgpt`). Upstream's optional
``explicit_zero_prob`` branch (``zero_logit.*``) is supported too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from scmm.model.cell_tower import WEIGHTS_NAME, load_state_dict_strict
from scmm.model.pretrained import PretrainedModel

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


def _mlp(d_in: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, 1),
    )


class ExprDecoder(PretrainedModel, nn.Module):
    """scGPT-style expression decoder: ``[B, L, d_in] -> [B, L]``; folder format ``scmm-expr-decoder``."""

    folder_format = "scmm-expr-decoder"

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

    def _write(self, tmp: Path) -> None:
        """``config.json`` (format ``scmm-expr-decoder``) + ``model.safetensors``."""
        self.save_weights(tmp / WEIGHTS_NAME, self.weights_of(self))
        self.write_config(tmp)

    @classmethod
    def _from_folder(cls, folder: Path, raw: dict, version: int,
                     map_location: str | torch.device = "cpu") -> ExprDecoder:
        model = cls(cls.read_config(ExprDecoderConfig, folder, raw))
        load_state_dict_strict(model, cls.load_weights(folder / WEIGHTS_NAME), what=str(folder))
        return model.to(map_location)


__all__ = ["ExprDecoder", "ExprDecoderConfig"]
