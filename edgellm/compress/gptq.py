"""GPTQ: block quantization that corrects rounding error with calibration activations.

Round-to-nearest (``quantize_rtn``) rounds every weight on its own. GPTQ (Frantar et al. 2022,
"Accurate Post-Training Quantization for Generative Pre-trained Transformers") instead minimises the
layer's *output* error ||X W^T - X Q^T||_F on calibration inputs X, one input column at a time: after
column j is rounded, its error is spread over the columns not yet quantized, weighted by how the
inputs correlate (the inverse Hessian H^-1 of that quadratic loss, H = 2 X^T X / T). The paper's
Cholesky form makes this one upper-triangular factor U of H^-1 instead of a fresh inverse per column:

    for each column j (left to right, or by decreasing H_jj with act_order):
        q_j   = quant(w_j)                      # with the block's scale, fixed when the block starts
        e_j   = (w_j - q_j) / U_jj               # (N,)
        w_k  -= e_j * U_jk     for every k > j   # OBS update, restricted to unquantized columns

The result uses exactly ``quantize_rtn``'s MatMulNBits layout (same zero point, scale and offset
rules), so the exporter and ``BlockQuantized.dequantize`` need nothing new. Pure numpy, float64 for
the factorisation and the error updates: the core install has no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgellm.errors import ConfigError
from edgellm.export.block_formats import BlockQuantized, pack, rtn_grid

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)  # 3-bit blocks run on the reference backend only (no ONNX Runtime kernel)
# Fewer rows than this give a Hessian that is mostly dampening: the "correction" then fits noise.
MIN_CALIBRATION_ROWS = 8
# Columns updated together before the deferred (lazy-batch) update of the rest; the paper's B = 128.
LAZY_BATCH_COLUMNS = 128


@dataclass(frozen=True)
class _BlockGrid:
    """One block's quantization grid for all N rows, fixed when the block's first column is reached."""

    scales: np.ndarray  # float32 (N,)
    lows: np.ndarray | None  # float32 (N,) block minimum (asymmetric), else None
    offsets: np.ndarray | None  # float32 (N,) lows + zero * scales, what dequantize() adds, else None


def gptq_quantize(weights: np.ndarray, activations: np.ndarray, bits: int, block_size: int = 32,
                  symmetric: bool = True, damp: float = 0.01, act_order: bool = False) -> BlockQuantized:
    """Quantize a linear layer's weights (N, K) with GPTQ error correction on calibration inputs (T, K).

    ``activations`` are the inputs the layer sees (rows of X in y = X W^T). ``damp`` is added to the
    Hessian diagonal as a fraction of its mean, which keeps the Cholesky factor stable when T < K or
    inputs are collinear; larger values move the result towards plain RTN. ``act_order`` processes
    columns with the largest H_jj first (the paper's trick for outlier inputs); the output layout is
    still in the original column order. Returns the same layout ``quantize_rtn(weights, bits,
    block_size, symmetric)`` would, with ``source`` naming GPTQ.
    """
    w, x = _validate(weights, activations, bits, block_size, damp)
    n, k = w.shape
    hessian = 2.0 * (x.T @ x) / x.shape[0]  # (K, K)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0  # an input that is always 0: any weight is exact, so pin it to 0
    w[:, dead] = 0.0
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(k)
    hessian = hessian[np.ix_(order, order)]
    hessian[np.diag_indices(k)] += damp * np.mean(np.diag(hessian))
    upper = _upper_cholesky_of_inverse(hessian)  # (K, K) in processing order

    codes, grids = _quantize_columns(w[:, order], upper, order, bits, block_size, symmetric)
    q = np.empty_like(codes)
    q[:, order] = codes
    nb = k // block_size
    scales = np.stack([grids[b].scales for b in range(nb)], axis=1)  # (N, K/block)
    offsets = None if symmetric else np.stack([grids[b].offsets for b in range(nb)], axis=0)  # (K/block, N)
    kind = "symmetric" if symmetric else "asymmetric"
    log.debug("GPTQ int%d %s: N=%d K=%d T=%d dead inputs=%d", bits, kind, n, k, x.shape[0], int(dead.sum()))
    return BlockQuantized(n, k, bits, block_size, pack(q, bits).reshape(n, nb, -1), scales.astype(np.float32),
                          1 << (bits - 1), offsets, source=f"int{bits} GPTQ {kind}")


def _validate(weights: np.ndarray, activations: np.ndarray, bits: int, block_size: int,
              damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Check arguments up front so a bad call fails with a message, not a LinAlgError mid-layer."""
    w, x = np.asarray(weights), np.asarray(activations)
    if w.ndim != 2 or x.ndim != 2:
        raise ConfigError(f"GPTQ needs weights (N, K) and activations (T, K); got shapes {w.shape} and {x.shape}")
    if w.shape[1] != x.shape[1]:
        raise ConfigError(f"GPTQ shape mismatch: weights have K={w.shape[1]} inputs but activations have "
                          f"{x.shape[1]} features; pass the layer's inputs (T, K)")
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"GPTQ bits={bits} is unsupported; valid: {', '.join(map(str, SUPPORTED_BITS))}")
    if block_size <= 0 or w.shape[1] % block_size or (block_size * bits) % 8:
        raise ConfigError(f"GPTQ block size {block_size} must divide K={w.shape[1]} and fill whole bytes "
                          f"at {bits} bits")
    if x.shape[0] < MIN_CALIBRATION_ROWS:
        raise ConfigError(f"GPTQ has too few calibration rows: {x.shape[0]} < {MIN_CALIBRATION_ROWS}; "
                          "collect more activations")
    if not (np.isfinite(damp) and damp >= 0):
        raise ConfigError(f"GPTQ damp must be a finite fraction >= 0, got {damp}")
    if not (np.isfinite(w).all() and np.isfinite(x).all()):
        raise ConfigError("GPTQ weights or activations contain NaN or inf")
    return w.astype(np.float64), x.astype(np.float64)


def _upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    """U with H^-1 = U^T U: row j holds the OBS update of columns > j once columns < j are fixed."""
    k = hessian.shape[0]
    try:
        lower = np.linalg.cholesky(hessian)
        lower_inv = np.linalg.solve(lower, np.eye(k))  # triangular; k is a layer width, fine
        return np.linalg.cholesky(lower_inv.T @ lower_inv).T
    except np.linalg.LinAlgError as exc:
        raise ConfigError("GPTQ Hessian is not positive definite; raise damp (e.g. 0.1) or add "
                          "calibration rows") from exc


def _quantize_columns(w: np.ndarray, upper: np.ndarray, order: np.ndarray, bits: int, block_size: int,
                      symmetric: bool) -> tuple[np.ndarray, dict[int, _BlockGrid]]:
    """Run GPTQ over w (N, K) already in processing order; returns codes (N, K) and per-block grids.

    Lazy batches: errors of a batch of columns update only that batch at once, and the rest of the
    matrix in one matrix product at the batch's end (same result, far fewer passes over memory).
    """
    n, k = w.shape
    codes = np.empty((n, k), dtype=np.uint8)
    grids: dict[int, _BlockGrid] = {}
    for start in range(0, k, LAZY_BATCH_COLUMNS):
        stop = min(start + LAZY_BATCH_COLUMNS, k)
        errors = np.zeros((n, stop - start))  # (N, batch) scaled errors e_j of this batch
        for j in range(start, stop):
            block = int(order[j]) // block_size
            if block not in grids:  # the block starts: its grid comes from its *current* weights
                members = np.flatnonzero(order // block_size == block)  # positions, all >= j
                current = _current_columns(w, upper, errors, start, j, members)
                grids[block] = _block_grid(current, bits, symmetric)
            codes[:, j], dequant = _quantize_column(w[:, j], grids[block], bits, symmetric)
            errors[:, j - start] = (w[:, j] - dequant) / upper[j, j]
            w[:, j + 1:stop] -= np.outer(errors[:, j - start], upper[j, j + 1:stop])
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return codes, grids


def _current_columns(w: np.ndarray, upper: np.ndarray, errors: np.ndarray, start: int, j: int,
                     members: np.ndarray) -> np.ndarray:
    """Columns `members` of w as they stand after columns < j: later batches still owe this batch's update."""
    cols = w[:, members].copy()  # (N, block)
    pending = members >= start + errors.shape[1]
    if pending.any():
        cols[:, pending] -= errors[:, :j - start] @ upper[start:j][:, members[pending]]
    return cols


def _block_grid(block: np.ndarray, bits: int, symmetric: bool) -> _BlockGrid:
    """quantize_rtn's grid (block_formats.rtn_grid), so both paths share one definition."""
    scales, lo = rtn_grid(block.astype(np.float32), bits, symmetric)
    if lo is None:
        return _BlockGrid(scales, None, None)
    return _BlockGrid(scales, lo, (lo + (1 << (bits - 1)) * scales).astype(np.float32))


def _quantize_column(col: np.ndarray, grid: _BlockGrid, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N,) uint8 and the float32 values dequantize() will return for them."""
    c = col.astype(np.float32)
    zero, qmax = 1 << (bits - 1), (1 << bits) - 1
    if symmetric:
        q = np.clip(np.round(c / grid.scales) + zero, 0, qmax)
        return q.astype(np.uint8), (q.astype(np.float32) - zero) * grid.scales
    q = np.clip(np.round((c - grid.lows) / grid.scales), 0, qmax)
    return q.astype(np.uint8), (q.astype(np.float32) - zero) * grid.scales + grid.offsets
