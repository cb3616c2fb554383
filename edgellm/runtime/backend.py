"""The backend interface every target implements.

A backend holds a loaded model; a Session is one sequence's state on that backend (its own KV cache)
for a contiguous range of layers. A session whose range starts at layer 0 takes token ids; otherwise
it takes hidden states. A range that ends at the last layer returns logits; otherwise hidden states.
That is all the offloader, the FPGA/CPU hybrid and the generation loop need.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgellm.errors import ConfigError, ContextOverflowError
from edgellm.model.config import ModelConfig


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, stop) of an n_layers model."""

    start: int
    stop: int
    n_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop <= self.n_layers:
            raise ConfigError(
                f"layer range [{self.start}, {self.stop}) is not inside [0, {self.n_layers}]"
            )

    @classmethod
    def full(cls, n_layers: int) -> LayerRange:
        return cls(0, n_layers, n_layers)

    @property
    def takes_tokens(self) -> bool:
        return self.start == 0

    @property
    def returns_logits(self) -> bool:
        return self.stop == self.n_layers

    def __len__(self) -> int:
        return self.stop - self.start


class Session(ABC):
    """One sequence on one backend: owns the KV cache of its layer range."""

    def __init__(self, layers: LayerRange, max_tokens: int) -> None:
        self.layers = layers
        self.max_tokens = max_tokens
        self.position = 0  # tokens already in the cache
        self.vocab_size: int | None = None  # set by Backend.open_session; token ids are checked against it

    def forward(self, inputs: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Advance by T positions.

        inputs: int ids (T,) when the range starts at layer 0, else float32 hidden states (T, hidden).
        returns: logits (T, vocab) if all_logits else (1, vocab) for the last position, when the range
        ends at the last layer; hidden states (T, hidden) otherwise.
        """
        n = int(inputs.shape[0])
        if n == 0:
            raise ConfigError("forward() needs at least one position")
        if self.layers.takes_tokens and self.vocab_size is not None:
            ids = np.asarray(inputs)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ConfigError(f"token ids must be a 1-D integer array, found {ids.dtype} with shape {ids.shape}")
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                raise ConfigError(f"token id {int(ids.max() if ids.max() >= self.vocab_size else ids.min())} is "
                                  f"outside the vocabulary [0, {self.vocab_size})")
        if self.position + n > self.max_tokens:
            raise ContextOverflowError(
                f"{self.position} cached + {n} new tokens exceed this session's context of {self.max_tokens}"
            )
        out = self._forward(inputs, all_logits)
        self.position += n
        return out

    @abstractmethod
    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray: ...

    def truncate(self, n_tokens: int) -> None:
        """Forget cached positions >= n_tokens (re-planning and recompute roll back this way)."""
        if not 0 <= n_tokens <= self.position:
            raise ConfigError(f"cannot truncate a session at {self.position} tokens to {n_tokens}")
        self._truncate(n_tokens)
        self.position = n_tokens

    def _truncate(self, n_tokens: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot roll back its cache")

    def reset(self) -> None:
        self.truncate(0)

    def export_kv(self, start: int | None = None, stop: int | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Keys and values of layers [start, stop) for the cached positions, each (position, n_kv_heads,
        head_dim) float32: what moves when a layer changes sides of a split."""
        start = self.layers.start if start is None else start
        stop = self.layers.stop if stop is None else stop
        if not self.layers.start <= start <= stop <= self.layers.stop:
            raise ConfigError(f"layers [{start}, {stop}) are not inside this session's "
                              f"[{self.layers.start}, {self.layers.stop})")
        return {i: self.read_kv(i) for i in range(start, stop)}

    def import_kv(self, kv: dict[int, tuple[np.ndarray, np.ndarray]], position: int) -> None:
        """Adopt a cache built elsewhere: every layer of this range for positions [0, position)."""
        missing = [i for i in range(self.layers.start, self.layers.stop) if i not in kv]
        if missing:
            raise ConfigError(f"import_kv needs every layer of [{self.layers.start}, {self.layers.stop}); "
                              f"missing {missing}")
        if not 0 <= position <= self.max_tokens:
            raise ContextOverflowError(f"{position} cached tokens exceed this session's context of {self.max_tokens}")
        for i in range(self.layers.start, self.layers.stop):
            keys, values = kv[i]
            if keys.shape[0] != position or values.shape[0] != position:
                raise ConfigError(f"layer {i}: {keys.shape[0]} keys / {values.shape[0]} values for {position} positions")
            self.write_kv(i, keys, values)
        self._set_position(position)

    def _set_position(self, position: int) -> None:
        self.position = position

    def read_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} cannot export its cache")

    def write_kv(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot import a cache")


class Backend(ABC):
    """A loaded model on one target. Subclasses register under `name` (see registry)."""

    name: ClassVar[str] = ""
    supports_layer_ranges: ClassVar[bool] = True

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def open_session(self, layers: LayerRange | None = None, max_tokens: int | None = None) -> Session:
        layers = LayerRange.full(self.config.n_layers) if layers is None else layers  # an empty range is falsy
        if not self.supports_layer_ranges and (layers.start, layers.stop) != (0, self.config.n_layers):
            raise ConfigError(f"backend {self.name!r} runs only the whole model, not layers {layers}")
        max_tokens = max_tokens or self.config.context_length
        if max_tokens > self.config.context_length:
            raise ContextOverflowError(
                f"requested context {max_tokens} exceeds the model's {self.config.context_length}"
            )
        session = self._open(layers, max_tokens)
        session.vocab_size = self.config.vocab_size
        return session

    @abstractmethod
    def _open(self, layers: LayerRange, max_tokens: int) -> Session: ...
