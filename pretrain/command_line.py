"""The training scripts' command-line options, one owner for ``scmm pretrain``, ``scmm finetune`` and the scripts
a launcher runs (``deepspeed pretrain/train.py``, ``torchrun finetune/train.py``;
:func:`scmm.pretrain.engine.script_main`).

Only argparse is imported here: the ``scmm`` command builds its parser without loading torch.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from scmm.cli_types import positive_int

__all__ = ["add_training_options", "run_training"]


def add_training_options(parser: argparse.ArgumentParser, config_required: bool = True,
                         config_help: str = "the stage's YAML config", only: str = "") -> None:
    """``--config FILE [--resume] [--deepspeed_config JSON] [--stop-at STEP]``; ``only`` ends the help of the last
    three (e.g. "stage 2 only" where the command also runs other actions)."""
    note = f"; {only}" if only else ""
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument("--resume", action="store_true", help=f"continue from the latest checkpoint{note}")
    parser.add_argument("--deepspeed_config", default=None, help=f"DeepSpeed JSON (overrides the config's{note})")
    parser.add_argument("--stop-at", type=positive_int, default=None,
                        help=f"end this launch after that step, with a checkpoint{note}")


def run_training(args: argparse.Namespace, load_config: Callable[[str], Any], train: Callable[..., Any]) -> None:
    """Train with the options of :func:`add_training_options`."""
    train(load_config(args.config), resume=args.resume, deepspeed_json=args.deepspeed_config, stop_at=args.stop_at)
