"""RoPE frequencies, computed once for every backend (numpy, float64; no torch)."""

from __future__ import annotations

import numpy as np

from edgellm.model.description import ModelDescription


def inverse_frequencies(description: ModelDescription) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, divided by linear scaling and by a `rope_freqs.weight` tensor if present
    (how llama3-style scaling travels in GGUF and in edgellm's Hugging Face loader)."""
    cfg = description.config
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if cfg.rope_scaling.kind == "linear":
        inv = inv / cfg.rope_scaling.factor
    if "rope_freqs.weight" in description.weights:
        inv = inv / description.weights.float("rope_freqs.weight").astype(np.float64)
    return inv
