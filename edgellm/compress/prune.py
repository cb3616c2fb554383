"""Unstructured and N:M pruning of linear layers: magnitude, Wanda and SparseGPT, at a sparsity ratio or
an N:M pattern (2:4, 4:8: keep N of every M consecutive inputs of a row).

Every method compares weights within one output row (the comparison group Wanda found best for LLMs),
so each row ends with exactly round(sparsity * K) zeros, or exactly M-N zeros in every group of M.

  magnitude  score |W_ij|
  wanda      score |W_ij| * ||X_j||_2   (Sun et al. 2023): the input feature's norm over calibration
             tokens weights each weight by how much signal flows through it; no weight update
  sparsegpt  (Frantar & Alistarh 2023) OBS with the inverse-Hessian Cholesky factor U, as in GPTQ:
             for each block of B columns, the mask is chosen from w^2 / U_jj^2 on the *current*
             (already error-updated) weights, then column by column
                 e_j  = (w_j - mask_j * w_j) / U_jj      # error of zeroing the pruned entries
                 w_k -= e_j * U_jk   for k > j            # spread it over the columns to come
             so the kept weights absorb the pruned ones' contribution to X W^T.

Pure numpy, float64 for the factorisation and the updates. The calibration statistics are per fused
unit (Q|K|V and gate|up share their input): the squared input norms for Wanda and H = 2 X^T X / T for
SparseGPT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgellm.compress.recipe import register_pass
from edgellm.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERN_EXAMPLES = ("unstructured", "2:4", "4:8")
SPARSEGPT_BLOCK = 128  # the paper's B: columns whose mask is chosen together (lazy-batch width too)


@dataclass(frozen=True)
class Pattern:
    """Which weights of a row may be zero: unstructured (n = m = 0) or N:M (keep n of every m)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return (self.m - self.n) / self.m if self.m else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def parse_pattern(spec: str) -> Pattern:
    """"unstructured" or "N:M" with 0 < N < M (e.g. "2:4" keeps 2 of every 4)."""
    valid = f"valid: {', '.join(PATTERN_EXAMPLES)} or any N:M with 0 < N < M"
    if spec == "unstructured":
        return Pattern()
    parts = str(spec).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"sparsity pattern {spec!r} unknown; {valid}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ConfigError(f"sparsity pattern {spec!r} needs 0 < N < M (keep N of every M); {valid}")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be a fraction in [0, 1), found {sparsity!r}")
    return float(sparsity)


def prune_mask(scores: np.ndarray, sparsity: float, pattern: Pattern = Pattern()) -> np.ndarray:
    """Boolean (N, K), True where a weight is pruned: the lowest scores of each row (ties: lower index
    first), round(sparsity * K) of them, or the lowest M-N of every M consecutive columns for N:M."""
    n_rows, k = scores.shape
    if pattern.structured:
        if k % pattern.m:
            raise ConfigError(f"N:M pattern {pattern} needs K={k} to be a multiple of {pattern.m}")
        groups = scores.reshape(n_rows, k // pattern.m, pattern.m)
        order = np.argsort(groups, axis=-1, kind="stable")[..., : pattern.m - pattern.n]
        mask = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(mask, order, True, axis=-1)
        return mask.reshape(n_rows, k)
    count = int(round(check_sparsity(sparsity) * k))
    mask = np.zeros((n_rows, k), dtype=bool)
    if count:
        np.put_along_axis(mask, np.argsort(scores, axis=1, kind="stable")[:, :count], True, axis=1)
    return mask


def wanda_scores(weights: np.ndarray, input_sq_norms: np.ndarray) -> np.ndarray:
    """|W_ij| * ||X_j||_2 from the per-feature sums of squared inputs (K,)."""
    return np.abs(weights) * np.sqrt(np.asarray(input_sq_norms, dtype=np.float64))[None, :]


def magnitude_prune(weights: np.ndarray, sparsity: float, pattern: Pattern = Pattern()) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float32)
    return np.where(prune_mask(np.abs(w), sparsity, pattern), 0.0, w).astype(np.float32)


def wanda_prune(weights: np.ndarray, input_sq_norms: np.ndarray, sparsity: float,
                pattern: Pattern = Pattern()) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float32)
    return np.where(prune_mask(wanda_scores(w, input_sq_norms), sparsity, pattern), 0.0, w).astype(np.float32)


def sparsegpt_prune(weights: np.ndarray, hessian: np.ndarray, sparsity: float, pattern: Pattern = Pattern(),
                    damp: float = 0.01, block_size: int = SPARSEGPT_BLOCK) -> np.ndarray:
    """SparseGPT on W (N, K) with H = 2 X^T X / T (K, K); returns the pruned, error-corrected weights.

    Unstructured: inside each block of `block_size` columns every row prunes the lowest w^2 / U_jj^2, as
    many as keep its running total at round(sparsity * columns so far) (so each row ends exactly at
    round(sparsity * K)). N:M: each group of M columns is chosen when the sweep reaches it.
    """
    w = np.array(weights, dtype=np.float64)
    n_rows, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise ConfigError(f"SparseGPT Hessian shape {h.shape} does not match weights with K={k}")
    if not (np.isfinite(damp) and damp >= 0):
        raise ConfigError(f"SparseGPT damp must be a finite fraction >= 0, found {damp}")
    if pattern.structured and block_size % pattern.m:
        raise ConfigError(f"SparseGPT block size {block_size} must be a multiple of M={pattern.m}")
    if pattern.structured and k % pattern.m:
        raise ConfigError(f"N:M pattern {pattern} needs K={k} to be a multiple of {pattern.m}")
    sparsity = pattern.sparsity if pattern.structured else check_sparsity(sparsity)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # an input that is always 0: its weights never matter; prune them for free
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    upper = _upper_cholesky_of_inverse(h)
    mask = np.zeros((n_rows, k), dtype=bool)
    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        block = w[:, start:stop]  # a view: updated in place
        diag = np.diag(upper)[start:stop]
        errors = np.zeros((n_rows, stop - start))
        if not pattern.structured:  # this block's share of each row's pruned count
            count = int(round(sparsity * stop)) - int(round(sparsity * start))
            mask[:, start:stop] = prune_mask(block ** 2 / diag[None, :] ** 2, count / (stop - start))
        for j in range(stop - start):
            col = start + j
            if pattern.structured and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                mask[:, col:col + pattern.m] = prune_mask(block[:, group] ** 2 / diag[None, group] ** 2, 0.0,
                                                          Pattern(pattern.n, pattern.m))
            pruned = np.where(mask[:, col], block[:, j], 0.0)  # w - q, with q = w where kept, 0 where pruned
            errors[:, j] = pruned / upper[col, col]
            block[:, j:] -= np.outer(errors[:, j], upper[col, col:stop])
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    w[mask] = 0.0  # exactly zero (the updates above leave them at rounding level)
    return w.astype(np.float32)


def _upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    from edgellm.compress.gptq import _upper_cholesky_of_inverse as factor

    try:
        return factor(hessian)
    except ConfigError as exc:
        raise ConfigError("SparseGPT Hessian is not positive definite; raise damp (e.g. 0.1) or add "
                          "calibration tokens") from exc


# ---------------------------------------------------------------------------------------------------
# OWL: outlier-weighted layer-wise sparsity (Yin et al. 2023)
# ---------------------------------------------------------------------------------------------------

def outlier_ratio(scores: list[np.ndarray], threshold: float = 5.0) -> float:
    """Fraction of a layer's Wanda scores (all its linears together) above `threshold` x their mean."""
    flat = np.concatenate([np.ravel(s) for s in scores])
    return float(np.mean(flat > threshold * flat.mean()))


def owl_sparsities(ratios: list[float] | np.ndarray, target: float, spread: float) -> np.ndarray:
    """Per-layer sparsity with mean `target` in [target - spread, target + spread]: layers with more
    outliers keep more weights (OWL's min-max scaling of the outlier ratios to [0, 2*spread])."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.max() > r.min():
        keep = (r - r.min()) / (r.max() - r.min()) * 2 * spread
        keep = keep - keep.mean() + (1.0 - target)
    else:
        keep = np.full_like(r, 1.0 - target)
    return 1.0 - keep


# ---------------------------------------------------------------------------------------------------
# The recipe pass
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PruneParams:
    """Unstructured or N:M pruning of every linear in the decoder layers (embedding and lm_head kept).

    sparsity: fraction of each row's weights set to zero (unstructured); an N:M pattern fixes it to
    (M-N)/M. owl: per-layer sparsities around the mean from each layer's outlier ratio (unstructured
    only), spread at most owl_lambda either side; owl_m is the outlier threshold (x the mean score).
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    calibration: str = "asyoulik.txt"
    tokens: int = 2048
    window: int = 512
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"pruning method {self.method!r} unknown; valid: {', '.join(METHODS)}")
        pattern = parse_pattern(self.pattern)
        if pattern.structured:
            if self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise ConfigError(f"sparsity {self.sparsity} disagrees with pattern {pattern} (= {pattern.sparsity}); "
                                  "omit sparsity for an N:M pattern")
            if self.owl:
                raise ConfigError(f"owl sets per-layer sparsities, which a fixed {pattern} pattern cannot follow; "
                                  "use pattern = \"unstructured\" with owl")
        elif self.sparsity is None:
            raise ConfigError("unstructured pruning needs sparsity (a fraction in [0, 1), e.g. 0.5)")
        else:
            check_sparsity(self.sparsity)
        if self.owl and not 0 <= self.owl_lambda <= min(self.sparsity, 1 - self.sparsity):
            raise ConfigError(f"owl_lambda must be in [0, min(sparsity, 1 - sparsity)], found {self.owl_lambda}")
        if self.owl_m <= 0:
            raise ConfigError(f"owl_m must be > 0, found {self.owl_m}")
        if self.tokens < self.window or self.window < 2:
            raise ConfigError(f"need tokens >= window >= 2, found tokens={self.tokens} window={self.window}")
        if not (np.isfinite(self.damp) and self.damp >= 0):
            raise ConfigError(f"damp must be a finite fraction >= 0, found {self.damp}")


@register_pass("prune", PruneParams)
def prune_pass(state, p: PruneParams) -> None:
    """Prune layer by layer on calibration text (each layer sees the pruned earlier layers' outputs)."""
    import torch

    from edgellm.compress.calibration import calibration_tokens, layer_stream
    from edgellm.compress.units import units
    from edgellm.model.llama import LlamaModel
    from edgellm.model.weights import WeightTensor

    model = state.model
    pattern = parse_pattern(p.pattern)
    ref = LlamaModel(model)
    ids = calibration_tokens(model, p.calibration, p.tokens, p.window) if p.method != "magnitude" or p.owl else []
    layer_sparsity = [pattern.sparsity if pattern.structured else float(p.sparsity)] * ref.config.n_layers
    ratios: list[float] = []
    if p.owl:
        ratios = _outlier_ratios(ref, ids, p, state.progress)
        layer_sparsity = [float(s) for s in owl_sparsities(ratios, float(p.sparsity), p.owl_lambda)]
    by_layer: dict[int, list] = {}
    for u in units(ref.config):
        by_layer.setdefault(u.layer, []).append(u)
    errors: list[float] = []
    zeros = total = 0
    stream = layer_stream(ref, ids, p.window, state.progress, desc=f"prune {p.method}") if ids else \
        ((i, {}) for i in range(ref.config.n_layers))
    for i, inputs in stream:
        for unit in by_layer[i]:
            w = np.concatenate([model.weights.float(f"{m}.weight") for m in unit.members])
            x = inputs.get(unit.name)
            pruned = prune_weights(w, x, p.method, layer_sparsity[i], pattern, p.damp)
            if x is not None:
                exact = x @ w.T
                errors.append(float(np.linalg.norm(exact - x @ pruned.T) / max(np.linalg.norm(exact), 1e-30)))
            zeros += int((pruned == 0).sum())
            total += pruned.size
            start = 0
            for m in unit.members:
                rows = model.weights[f"{m}.weight"].shape[0]
                part = np.ascontiguousarray(pruned[start:start + rows])
                model.weights.replace(f"{m}.weight", WeightTensor.from_array(f"{m}.weight", part))
                state.rewritten.add(f"{m}.weight")
                ref.layers[i][m.split(".", 2)[2]] = torch.from_numpy(part)
                start += rows
    state.report["prune"] = {
        "method": p.method, "pattern": str(pattern), "sparsity": None if pattern.structured else p.sparsity,
        "achieved_sparsity": zeros / total, "calibration_tokens": len(ids),
        "layer_sparsity": [round(s, 4) for s in layer_sparsity], "owl_outlier_ratios": ratios,
        "relative_output_error_median": float(np.median(errors)) if errors else None,
    }
    log.info("pruned %s %s: %.3f of the layers' linear weights are zero", p.method, pattern, zeros / total)


def prune_weights(w: np.ndarray, x: np.ndarray | None, method: str, sparsity: float, pattern: Pattern,
                  damp: float = 0.01) -> np.ndarray:
    """One unit's weights (N, K) pruned by `method`; x (T, K) are its calibration inputs (not needed
    for magnitude)."""
    if method == "magnitude":
        return magnitude_prune(w, sparsity, pattern)
    if x is None:
        raise ConfigError(f"{method} pruning needs calibration inputs")
    x64 = x.astype(np.float64)
    if method == "wanda":
        return wanda_prune(w, (x64 ** 2).sum(0), sparsity, pattern)
    return sparsegpt_prune(w, 2.0 * (x64.T @ x64) / x64.shape[0], sparsity, pattern, damp)


def _outlier_ratios(ref, ids: list[int], p: PruneParams, progress: bool) -> list[float]:
    """Each layer's outlier ratio from Wanda scores on the dense model's activations."""
    from edgellm.compress.calibration import layer_stream
    from edgellm.compress.units import units

    members = {u.name: u.members for u in units(ref.config)}
    ratios = []
    for i, inputs in layer_stream(ref, ids, p.window, progress, desc="owl outlier ratios"):
        scores = []
        for name, x in inputs.items():
            norms = (x.astype(np.float64) ** 2).sum(0)
            for m in members[name]:
                scores.append(wanda_scores(ref.layers[i][m.split(".", 2)[2]].numpy(), norms))
        ratios.append(outlier_ratio(scores, p.owl_m))
    return ratios
