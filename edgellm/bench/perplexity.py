"""Perplexity over fixed windows, the convention of shared/notes/baselines.md.

Each window of `window` tokens is evaluated from an empty KV cache and every prediction after its
first token counts (window - 1 per window); log-softmax in float64. The same evaluator drives any
backend, llama.cpp included, so two engines differ only in their numerics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from edgellm.errors import ConfigError
from edgellm.runtime.backend import Backend


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    n_predictions: int
    nll_sum: float
    n_windows: int
    window: int
    stride: int
    window_ppl: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def token_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row, computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return z[np.arange(len(targets)), targets] - log_norm


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) spans; a trailing span shorter than 2 tokens predicts nothing and is dropped."""
    spans = []
    for start in range(0, n_tokens, stride):
        end = min(start + window, n_tokens)
        if end - start >= 2:
            spans.append((start, end))
        if end == n_tokens:
            break
    return spans


def perplexity(backend: Backend, token_ids: Sequence[int], window: int = 512, stride: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of `token_ids` under `backend`, windows of `window` tokens every `stride` tokens."""
    stride = window if stride is None else stride
    if window < 2 or stride < 1 or stride > window:
        raise ConfigError(f"need window >= 2 and 1 <= stride <= window, found window={window} stride={stride}")
    ids = np.asarray(token_ids, dtype=np.int64)
    spans = windows(len(ids), window, stride)
    if not spans:
        raise ConfigError(f"text has {len(ids)} tokens: need at least 2 to measure perplexity")
    session = backend.open_session(max_tokens=window)
    nll_sum, count, per_window = 0.0, 0, []
    iterator = spans
    if progress:
        from tqdm import tqdm

        iterator = tqdm(spans, desc=f"ppl ({backend.name})", unit="window")
    for start, end in iterator:
        session.reset()
        chunk = ids[start:end]
        logits = session.forward(chunk, all_logits=True)  # (T, vocab)
        # With stride < window, only tokens not scored by the previous window count.
        first = 0 if start == 0 or stride == window else window - stride - 1
        lp = token_log_probs(logits[first:-1], chunk[first + 1:])
        nll_sum -= float(lp.sum())
        count += len(lp)
        per_window.append(math.exp(-float(lp.mean())))
    return PerplexityResult(
        ppl=math.exp(nll_sum / count), n_predictions=count, nll_sum=nll_sum, n_windows=len(spans),
        window=window, stride=stride, window_ppl=per_window,
    )
