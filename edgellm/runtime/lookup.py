"""Prompt-lookup drafting: speculative decoding whose draft model is the context itself.

Small models, summaries, code edits and chat answers that quote the prompt repeat n-grams of their
context. When the last n tokens occurred before, the tokens that followed them then are a cheap guess
for what comes next. One forward pass over [next token, guess...] checks every guess at once (the
same weights streamed once, like a short prefill), and each guess the model itself would have chosen
is accepted. The sampler is called once per position, in order, on that position's logits, so given
the same logits the output is the plain decode's token for token, greedy or seeded sampling alike (a
deterministic guess is kept with probability p(guess), the distribution is unchanged). Engines with
int8 activations (ONNX Runtime's int4 kernels, llama.cpp) round a several-position pass slightly
differently from a one-position pass, so there a near tie between two tokens can go the other way.

It pays where a multi-token forward costs little more than a single-token one, as on ONNX Runtime
here (prefill per token is several times cheaper than decode per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgellm.errors import ConfigError


@dataclass(frozen=True)
class LookupConfig:
    max_draft: int = 4  # tokens guessed per forward pass
    max_ngram: int = 3  # longest context suffix looked up; shorter ones are tried when it is not found
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.max_draft < 1:
            raise ConfigError(f"max_draft must be >= 1, found {self.max_draft}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(f"need 1 <= min_ngram <= max_ngram, found {self.min_ngram} and {self.max_ngram}")


class PromptLookup:
    """Latest continuation of every n-gram of a growing token list, updated incrementally: a guess
    costs a few dictionary look-ups, not a scan of the context (decode steps here are milliseconds)."""

    def __init__(self, config: LookupConfig = LookupConfig()) -> None:
        self.config = config
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index just past its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in _after

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest earlier occurrence of history's suffix.

        history may only grow between calls (tokens are appended, never replaced)."""
        cfg = self.config
        end = len(history) - 1  # the suffix itself ends at `end`: index only what ends before it
        for p in range(self._indexed, end):
            for n in range(cfg.min_ngram, min(cfg.max_ngram, p + 1) + 1):
                self._after[tuple(history[p + 1 - n:p + 1])] = p + 1
        self._indexed = max(self._indexed, end)
        if limit <= 0:
            return []
        for n in range(min(cfg.max_ngram, len(history)), cfg.min_ngram - 1, -1):
            at = self._after.get(tuple(history[-n:]))
            if at is not None:
                return [int(t) for t in history[at:at + limit]]
        return []
