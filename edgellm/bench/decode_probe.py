"""A short decode timing of an exported directory, for checking a plan against its prediction."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def decode_ms_per_token(directory: Path, threads: int = 2, prompt: int = 64, tokens: int = 48, rounds: int = 3) -> float:
    """Median over `rounds` of the mean single-token forward time after a `prompt`-token prefill."""
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    model = load_model(directory)
    backend = create_backend("onnxruntime", model, threads=threads)
    vocab = model.config.vocab_size
    samples = []
    for _ in range(rounds):
        session = backend.open_session(max_tokens=prompt + tokens + 1)
        session.forward(np.arange(100, 100 + prompt) % vocab)
        start = time.perf_counter()
        for i in range(tokens):
            session.forward(np.array([(300 + i) % vocab]))
        samples.append((time.perf_counter() - start) / tokens * 1e3)
    return statistics.median(samples)
