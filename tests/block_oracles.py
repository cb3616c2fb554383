"""Independent oracles for edgellm's block kernels: gguf-py's own quantize/dequantize, and numpy
emulating the kernels' int8 activation quantization in float64."""

from __future__ import annotations

import gguf
import numpy as np

EMULATION_RTOL = 1e-5  # only the float accumulation order differs from the emulation


def gguf_blocks(fmt: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, fmt))


def gguf_float(blocks: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, fmt)).astype(np.float64)


def emulated(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x quantized to int8 per block of 32 exactly as the kernel does, times w, in float64."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    d = np.abs(xb).max(-1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0).astype(np.float32)
    q = np.rint(xb * inv[..., None])  # numpy rounds half to even, like the kernel
    return (q * d[..., None]).reshape(m, k).astype(np.float64) @ w.T
