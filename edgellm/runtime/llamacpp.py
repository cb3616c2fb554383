"""llama.cpp (llama-cpp-python) as a second engine behind the same interface.

It is the comparison everyone trusts, so perplexity, generation and benchmarks can run it through the
very code paths edgellm's own backends use. It runs the whole model only (no layer ranges).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, missing_extra
from edgellm.model.config import ModelConfig
from edgellm.model.description import ModelDescription
from edgellm.runtime.backend import Backend, LayerRange, Session

try:
    import llama_cpp
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("llama-cpp-python", "bench") from exc


class LlamaCppSession(Session):
    def __init__(self, backend: LlamaCppBackend, layers: LayerRange, max_tokens: int) -> None:
        super().__init__(layers, max_tokens)
        self.backend = backend
        self.llm = backend.context(max_tokens)
        self.llm.reset()  # llama-cpp-python would otherwise reuse a cached prefix

    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray:
        llm = self.llm
        if llm.n_tokens != self.position:
            raise ConfigError("llama.cpp context was taken over by another session of the same backend")
        if all_logits and not self.backend.logits_all:  # checked before eval(): the session stays usable
            raise ConfigError("open the llama.cpp backend with logits_all=True to get every position's logits "
                              "(prompt-lookup drafting and perplexity need them)")
        ids = [int(t) for t in np.asarray(inputs).reshape(-1)]
        llm.eval(ids)
        if all_logits:
            return np.array(llm.scores[self.position:self.position + len(ids)], dtype=np.float32)
        if self.backend.logits_all:
            return np.array(llm.scores[self.position + len(ids) - 1][None, :], dtype=np.float32)
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(1, llm.n_vocab())).astype(np.float32, copy=True)

    def _truncate(self, n_tokens: int) -> None:
        self.llm.n_tokens = n_tokens  # the next eval() drops cache entries past n_tokens


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    supports_layer_ranges = False

    def __init__(self, config: ModelConfig, path: Path, threads: int | None = None,
                 logits_all: bool = False, n_batch: int = 512) -> None:
        super().__init__(config)
        self.path = path
        self.threads = threads or max(1, (os.cpu_count() or 1))
        self.logits_all = logits_all
        self.n_batch = n_batch
        self._llm: Any = None
        self._n_ctx = 0

    @classmethod
    def from_model(cls, description: ModelDescription, threads: int | None = None,
                   logits_all: bool = False, **_: Any) -> LlamaCppBackend:
        if description.source.suffix.lower() != ".gguf":
            raise ConfigError(f"the llama.cpp backend needs a GGUF file, found {description.source}")
        return cls(description.config, description.source, threads=threads, logits_all=logits_all)

    def context(self, n_ctx: int) -> Any:
        """The llama.cpp context, (re)created when a session needs a larger one."""
        if self._llm is None or n_ctx > self._n_ctx:
            self._llm = None
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
                self._llm = llama_cpp.Llama(
                    model_path=str(self.path), n_ctx=n_ctx, n_batch=min(self.n_batch, n_ctx),
                    n_threads=self.threads, n_threads_batch=self.threads,
                    logits_all=self.logits_all, verbose=False,
                )
            self._n_ctx = n_ctx
        return self._llm

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """llama.cpp's own tokenizer (the parity oracle for edgellm's)."""
        llm = self.context(max(self._n_ctx, 64))
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _open(self, layers: LayerRange, max_tokens: int) -> Session:
        return LlamaCppSession(self, layers, max_tokens)
