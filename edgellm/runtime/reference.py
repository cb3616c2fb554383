"""The torch reference backend: exact float math on the dequantized weights (the oracle)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgellm.errors import missing_extra
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
