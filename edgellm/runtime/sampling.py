"""Next-token selection from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgellm.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn; temperature 0 (or greedy=True) means argmax."""

    greedy: bool = False
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for key in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number, found {getattr(self, key)}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed must be >= 0, found {self.seed}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, found {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), found {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], found {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, found {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class Sampler:
    """Stateful (seeded RNG) token chooser; one per generation."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        cfg = self.config
        scores = np.asarray(logits, dtype=np.float64).copy()  # (vocab,)
        if cfg.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = scores[seen]
            # CTRL-style: shrink positive logits, grow negative ones, so repeats become less likely.
            scores[seen] = np.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
        if cfg.is_greedy:
            return int(np.argmax(scores))
        scores = scores / cfg.temperature
        if 0 < cfg.top_k < scores.size:
            kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
            scores[scores < kth] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < cfg.top_p  # always keeps the most likely token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
