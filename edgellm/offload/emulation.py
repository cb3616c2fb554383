"""An emulated board: the real computation of a host backend, timed as a board with given per-layer costs.

Offloading pays when the device is slower than the server; on one machine both are the same CPU. For
evaluation and tests the device runs the real computation (so tokens, KV and bytes are real) and then
sleeps until the board's time for that forward has passed:

    board ms = sum over the session's layers of (decode ms, or prefill ms/token x T) + head ms (if it ends
               at the last layer)

Sleeping to a target (not "sleep (factor - 1) x what the host took") keeps a loaded host's hiccups from
being multiplied, and frees the CPU as a slower chip would. The device profile the planner uses is then
measured on this wrapper like on any backend, never copied from the board's numbers.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from edgellm.errors import ConfigError
from edgellm.offload.profile import LayerProfile, measure_layer_profile
from edgellm.runtime.backend import Backend, LayerRange, Session


class EmulatedSession(Session):
    """A session of the inner backend, each forward() lasting at least the board's time for it."""

    def __init__(self, inner: Session, board: LayerProfile) -> None:
        self.inner = inner
        super().__init__(inner.layers, inner.max_tokens)
        self.board = board

    @property
    def position(self) -> int:  # type: ignore[override]
        return self.inner.position

    @position.setter
    def position(self, value: int) -> None:
        self.inner.position = value

    def read_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.read_kv(layer)

    def write_kv(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        self.inner.write_kv(layer, keys, values)

    def _set_position(self, position: int) -> None:
        self.inner._set_position(position)

    def board_ms(self, n_tokens: int, all_logits: bool) -> float:
        r = self.layers
        ms = self.board.layers_ms(r.start, r.stop, n_tokens, prefill=n_tokens > 1)
        if r.returns_logits:
            ms += self.board.head_ms * (n_tokens if all_logits else 1)
        return ms

    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner._forward(inputs, all_logits)  # Session.forward (ours) advances the shared position
        left = t0 + self.board_ms(int(inputs.shape[0]), all_logits) / 1e3 - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return out

    def _truncate(self, n_tokens: int) -> None:
        self.inner._truncate(n_tokens)


class EmulatedBackend(Backend):
    """`inner`'s results on a board whose per-layer costs are `board`."""

    def __init__(self, inner: Backend, board: LayerProfile, name: str | None = None) -> None:
        if board.n_layers != inner.config.n_layers:
            raise ConfigError(f"board profile has {board.n_layers} layers, the model {inner.config.n_layers}")
        super().__init__(inner.config)
        self.inner, self.board = inner, board
        self.name = name or f"{inner.name}-emulated"
        self.supports_layer_ranges = inner.supports_layer_ranges

    @classmethod
    def slowed(cls, inner: Backend, factor: float, **measure_options) -> EmulatedBackend:
        """A board `factor` x slower than this host. The host's per-layer costs are measured (best of the
        repeats), then every layer gets the median over layers: a Llama's layers have one shape, and on a
        shared host single-layer timings scatter by several x."""
        if not factor >= 1.0:
            raise ConfigError(f"slow-down factor must be >= 1, found {factor}")
        host = measure_layer_profile(inner, statistic="min", **measure_options)
        decode = float(np.median(host.layer_ms_decode))
        prefill = float(np.median(host.layer_ms_prefill_per_token))
        board = LayerProfile.uniform(host.n_layers, decode, prefill, host.head_ms).scaled(factor)
        return cls(inner, replace(board, source=f"{host.source}, median layer, x {factor:g}"),
                   f"{inner.name}-x{factor:g}")

    def _open(self, layers: LayerRange, max_tokens: int) -> Session:
        session = EmulatedSession(self.inner.open_session(layers, max_tokens), self.board)
        session.vocab_size = self.config.vocab_size
        return session
