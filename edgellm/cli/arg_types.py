"""Argument types shared by the CLI's commands: one parser for every bounded number, one message shape."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded(kind: type, what: str, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Callable[[str], int | float]:
    """A parser for numbers of `kind` in [low, high] (or (low, high] with low_open), naming `what`."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, found {value}")
        return value

    return parse
