"""Small assertion helpers shared by tests."""

from __future__ import annotations

from collections.abc import Sequence


def first_difference(a: Sequence, b: Sequence) -> int | None:
    """Index of the first differing element (or the shorter length), None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
