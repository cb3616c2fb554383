"""The server's per-layer cost, measured at start-up with a short real run (the planner's cloud side).

Each layer runs alone on a one-layer session (layer 0 takes token ids, so its time includes the embedding);
the head runs on an empty range [n, n) (estimated from the last layer's range where a backend cannot
run the head alone). Prefill is timed over `prefill_tokens` positions and reported per
token; decode is the median of a few single-token steps after it. Measured, never assumed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

from edgellm.errors import ConfigError
from edgellm.runtime.backend import Backend, LayerRange


@dataclass(frozen=True)
class ServerProfile:
    layer_ms_decode: list[float]
    layer_ms_prefill_per_token: list[float]
    head_ms: float
    measured_at: str

    def as_dict(self) -> dict:
        return asdict(self)


def _time_range(backend: Backend, layers: LayerRange, prefill_tokens: int, decode_steps: int,
                rng: np.random.Generator) -> tuple[float, float]:
    """(ms per prefill token, median ms per decode step) for one range."""
    cfg = backend.config
    session = backend.open_session(layers, max_tokens=prefill_tokens + decode_steps)  # [n, n): the head alone

    def inputs(t: int) -> np.ndarray:
        if layers.takes_tokens:
            return rng.integers(0, cfg.vocab_size, size=t).astype(np.int64)
        return rng.standard_normal((t, cfg.hidden_size)).astype(np.float32)

    t0 = time.perf_counter()
    session.forward(inputs(prefill_tokens))
    prefill_ms = (time.perf_counter() - t0) * 1e3 / prefill_tokens
    steps = []
    for _ in range(decode_steps):
        t0 = time.perf_counter()
        session.forward(inputs(1))
        steps.append((time.perf_counter() - t0) * 1e3)
    return prefill_ms, statistics.median(steps)


def measure_server_profile(backend: Backend, prefill_tokens: int = 16, decode_steps: int = 3,
                           seed: int = 0) -> ServerProfile:
    """Time every layer and the head once (after a warm-up pass, so lazy allocations are not counted)."""
    n = backend.config.n_layers
    rng = np.random.default_rng(seed)
    _time_range(backend, LayerRange(0, min(1, n), n), 2, 1, rng)  # warm-up
    decode, prefill = [], []
    for i in range(n):
        p, d = _time_range(backend, LayerRange(i, i + 1, n), prefill_tokens, decode_steps, rng)
        prefill.append(p)
        decode.append(d)
    try:
        _, head = _time_range(backend, LayerRange(n, n, n), 1, decode_steps, rng)
    except ConfigError:  # a backend that cannot run the head alone (ONNX Runtime cuts need a layer)
        head = None
    if n:  # the last one-layer range also ran the head (on the last position): take it out
        if head is None:  # estimate: what the last range took beyond a typical layer
            typical = statistics.median(decode[:-1]) if n > 1 else 0.0
            head, decode[-1] = max(decode[-1] - typical, 0.0), typical
        else:
            decode[-1] = max(decode[-1] - head, 0.0)
        prefill[-1] = max(prefill[-1] - head / prefill_tokens, 0.0)
    return ServerProfile([round(x, 4) for x in decode], [round(x, 4) for x in prefill], round(head or 0.0, 4),
                         datetime.now(timezone.utc).isoformat())
