"""The numeric option types of the command line: every number an option takes is range-checked here, at parse
time, before any command runs (argparse turns a refusal into one ``error:`` line and exit 2).

Each type is a callable object for argparse's ``type=`` that knows its range, so that a test can walk every
numeric option of every command (:class:`IntRange` and :class:`FloatRange` instances) and so that the help can
say the range. Integers may be written in scientific notation when the value is whole (``--n 1e6``); NaN and
infinities are refused everywhere.
"""
from __future__ import annotations

import argparse
import math

__all__ = ["IntRange", "FloatRange", "MAX_INT", "MAX_SEED", "MAX_JOBS", "MAX_BEAMS", "MAX_K", "MAX_PSEUDOCELLS",
           "MAX_NOISE", "positive_int", "non_negative_int", "seed_int", "probability", "rate_below_1"]

MAX_INT = 2**31 - 1  # the largest count any option takes (sizes, steps): beyond it every use is a mistake
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_JOBS = 256  # worker processes of `scmm data build`
MAX_BEAMS = 64  # beams of `scmm describe` (each beam is a full decoding)
MAX_K = 1000  # neighbours of a k-NN vote or smoothing
MAX_PSEUDOCELLS = 1_000_000  # `scmm generate --n`; the same bound as scmm.api.MAX_PSEUDOCELLS (a test checks)
MAX_NOISE = 100.0  # `scmm generate --noise`: standard deviations of the sampling noise


def _number(text: str) -> float | int:
    """The number ``text`` names: an int when it is written as one, else a float (NaN and infinities refused)."""
    s = str(text).strip().replace("_", "")
    try:
        return int(s)
    except ValueError:
        pass
    try:
        value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class IntRange:
    """An integer option in ``[low, high]``; a whole number in float notation (``1e6``) is accepted."""

    def __init__(self, low: int, high: int = MAX_INT) -> None:
        self.low, self.high = low, high
        self.__name__ = f"integer in [{low}, {high}]"  # argparse's name of the type in its own messages

    def __call__(self, text: str) -> int:
        value = _number(text)
        if isinstance(value, float):
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
            value = int(value)
        if not self.low <= value <= self.high:
            raise argparse.ArgumentTypeError(f"must be an integer from {self.low} to {self.high}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"IntRange({self.low}, {self.high})"


class FloatRange:
    """A finite float option in ``[low, high]`` (``high_open``: ``[low, high)``)."""

    def __init__(self, low: float, high: float, high_open: bool = False) -> None:
        self.low, self.high, self.high_open = low, high, high_open
        self.__name__ = f"number in [{low:g}, {high:g}{')' if high_open else ']'}"

    def __call__(self, text: str) -> float:
        value = float(_number(text))
        if not (self.low <= value < self.high if self.high_open else self.low <= value <= self.high):
            raise argparse.ArgumentTypeError(f"must be a {self.__name__}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"FloatRange({self.low}, {self.high}, high_open={self.high_open})"


positive_int = IntRange(1)  # sizes and counts: cells, rows, steps
non_negative_int = IntRange(0)  # counts where none is meaningful (examples shown)
seed_int = IntRange(0, MAX_SEED)  # random seeds
probability = FloatRange(0.0, 1.0)  # shares, thresholds and coverages in [0, 1]
rate_below_1 = FloatRange(0.0, 1.0, high_open=True)  # --unknown-rate: 1 would abstain on every cell
