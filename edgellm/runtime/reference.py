"""The torch reference backend: exact float math on the dequantized weights (the oracle)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgellm.errors import ConfigError, missing_extra
from edgellm.model.description import ModelDescription
from edgellm.runtime.backend import Backend, LayerRange, Session

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("torch", "reference") from exc

from edgellm.model.llama import KVCache, LlamaModel  # noqa: E402  (needs torch)


class ReferenceSession(Session):
    def __init__(self, model: LlamaModel, layers: LayerRange, max_tokens: int) -> None:
        super().__init__(layers, max_tokens)
        self.model = model
        self.cache = KVCache.allocate(model.config, layers.start, layers.stop, max_tokens, model.dtype)

    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray:
        m, r = self.model, self.layers
        with torch.no_grad():
            if r.takes_tokens:
                x = m.embed(torch.as_tensor(np.asarray(inputs, dtype=np.int64)))
            else:
                x = torch.as_tensor(np.asarray(inputs)).to(m.dtype)
            x = m.run_layers(x, self.cache, r.start, r.stop)
            if not r.returns_logits:
                return x.to(torch.float32).numpy()
            if not all_logits:
                x = x[-1:]
            return m.head(x).numpy()

    def _truncate(self, n_tokens: int) -> None:
        self.cache.length = n_tokens

    def _set_position(self, position: int) -> None:
        self.position = position
        self.cache.length = position

    def read_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        j = self._slot(layer)
        n = self.cache.length
        return (self.cache.keys[j, :n].to(torch.float32).numpy().copy(),
                self.cache.values[j, :n].to(torch.float32).numpy().copy())

    def write_kv(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        j = self._slot(layer)
        want = tuple(self.cache.keys.shape[2:])
        for kind, data in (("keys", keys), ("values", values)):
            if data.ndim != 3 or tuple(data.shape[1:]) != want or data.shape[0] > self.cache.capacity:
                raise ConfigError(f"layer {layer} {kind} must be (<= {self.cache.capacity}, {want[0]}, {want[1]}), "
                                  f"found {tuple(data.shape)}")
        n = keys.shape[0]
        self.cache.keys[j, :n] = torch.as_tensor(np.asarray(keys)).to(self.cache.keys.dtype)
        self.cache.values[j, :n] = torch.as_tensor(np.asarray(values)).to(self.cache.values.dtype)

    def _slot(self, layer: int) -> int:
        if not self.layers.start <= layer < self.layers.stop:
            raise ConfigError(f"layer {layer} is not in this session's range [{self.layers.start}, {self.layers.stop})")
        return layer - self.layers.start


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, model: LlamaModel, threads: int | None = None) -> None:
        super().__init__(model.config)
        self.model = model
        if threads:
            torch.set_num_threads(threads)

    @classmethod
    def from_model(cls, description: ModelDescription, dtype: str = "float32", threads: int | None = None,
                   **_: Any) -> ReferenceBackend:
        return cls(LlamaModel(description, dtype=getattr(torch, dtype)), threads=threads)

    def _open(self, layers: LayerRange, max_tokens: int) -> Session:
        return ReferenceSession(self.model, layers, max_tokens)
