"""Hardware-aware mixed precision: choose one format per unit to minimise measured quality loss under
a model-size and/or a per-token latency budget, with latencies from the target's measured cost table.

Exact: a mixed-integer program (one binary per unit x format, one-hot per unit, budget rows), solved
by HiGHS through scipy. A dynamic program over the size budget cross-checks it in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgellm.compress.plan import QUANT_FORMATS, CompressionPlan
from edgellm.compress.units import Unit, format_bytes
from edgellm.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    max_bytes: int | None = None  # linear layers only (the allocate pass gives them what a smaller head frees)
    max_us: float | None = None  # summed linear latency per token

    def __post_init__(self) -> None:
        if self.max_bytes is None and self.max_us is None:
            raise ConfigError("a budget needs max_bytes, max_us or both")


@dataclass
class Allocation:
    choice: dict[str, str]  # unit name -> format
    loss: float
    bytes: int
    us: float
    solver: str
    plan_overrides: dict[str, str] = field(default_factory=dict)

    def plan(self, base: CompressionPlan, name: str) -> CompressionPlan:
        return CompressionPlan(default=base.default, overrides=dict(self.plan_overrides), lm_head=base.lm_head,
                               accuracy_level=base.accuracy_level,
                               lm_head_accuracy_level=base.lm_head_accuracy_level, name=name)


def _options(units: Sequence[Unit], formats: Sequence[str], loss: Mapping[str, Mapping[str, float]],
             cost_us: Callable[[Unit, str], float] | None):
    n_u, n_f = len(units), len(formats)
    kl = np.zeros((n_u, n_f))
    size = np.zeros((n_u, n_f), dtype=np.int64)
    lat = np.zeros((n_u, n_f))
    for i, u in enumerate(units):
        for j, f in enumerate(formats):
            if f not in loss.get(u.name, {}):
                raise ConfigError(f"no sensitivity for unit {u.name} in format {f}; measure it first")
            kl[i, j] = max(0.0, loss[u.name][f])
            if f == "auto" and u.auto_bytes is not None:
                size[i, j] = u.auto_bytes  # the source's own blocks, whatever their type
            else:
                size[i, j] = QUANT_FORMATS[f].nbytes(u.k, u.n) if f in QUANT_FORMATS else format_bytes(f, u.k, u.n)
            lat[i, j] = cost_us(u, f) if cost_us else 0.0
    return kl, size, lat


def allocate(units: Sequence[Unit], formats: Sequence[str], loss: Mapping[str, Mapping[str, float]],
             budget: Budget, cost_us: Callable[[Unit, str], float] | None = None) -> Allocation:
    """Minimum total loss under the budget (exact MILP)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if budget.max_us is not None and cost_us is None:
        raise ConfigError("a latency budget needs the target's cost table")
    kl, size, lat = _options(units, formats, loss, cost_us)
    n_u, n_f = kl.shape
    _check_feasible(budget, size, lat, formats)
    rows, lo, hi = [], [], []
    one_hot = np.zeros((n_u, n_u * n_f))
    for i in range(n_u):
        one_hot[i, i * n_f:(i + 1) * n_f] = 1
    rows.append(one_hot), lo.append(np.ones(n_u)), hi.append(np.ones(n_u))
    if budget.max_bytes is not None:
        rows.append(size.reshape(1, -1).astype(float)), lo.append([-np.inf]), hi.append([budget.max_bytes])
    if budget.max_us is not None:
        rows.append(lat.reshape(1, -1)), lo.append([-np.inf]), hi.append([budget.max_us])
    constraints = LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi))
    # a tiny size tie-breaker: among equal-loss choices prefer the smaller (e.g. lossless int4 over fp32)
    objective = kl.reshape(-1) + 1e-15 * size.reshape(-1)
    res = milp(objective, constraints=constraints, integrality=np.ones(n_u * n_f), bounds=Bounds(0, 1))
    if res.x is None:
        raise ConfigError(f"no plan meets the budget ({res.message})")
    pick = res.x.reshape(n_u, n_f).argmax(axis=1)
    return _result(units, formats, pick, kl, size, lat, "milp (HiGHS)")


def allocate_dp(units: Sequence[Unit], formats: Sequence[str], loss: Mapping[str, Mapping[str, float]],
                max_bytes: int, granularity: int = 4096) -> Allocation:
    """Exact for the size budget at `granularity`-byte resolution: DP over units x budget buckets."""
    kl, size, lat = _options(units, formats, loss, None)
    _check_feasible(Budget(max_bytes=max_bytes), size, lat, formats)
    cap = max_bytes // granularity
    w = -(-size // granularity)  # ceil: never exceeds the real budget
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(units), cap + 1), dtype=np.int64)
    for i in range(len(units)):
        nxt = np.full(cap + 1, np.inf)
        for j in range(len(formats)):
            shifted = np.full(cap + 1, np.inf)
            if w[i, j] <= cap:
                shifted[w[i, j]:] = best[:cap + 1 - w[i, j]] + kl[i, j]
            better = shifted < nxt
            nxt[better], back[i, better] = shifted[better], j
        best = nxt
    if not np.isfinite(best).any():
        raise ConfigError(f"no plan fits {max_bytes} bytes; the smallest needs {int(size.min(axis=1).sum())}")
    b = int(np.argmin(best))
    pick = np.zeros(len(units), dtype=np.int64)
    for i in range(len(units) - 1, -1, -1):
        pick[i] = back[i, b]
        b -= int(w[i, pick[i]])
    return _result(units, formats, pick, kl, size, lat, f"dp ({granularity}-byte buckets)")


def _check_feasible(budget: Budget, size: np.ndarray, lat: np.ndarray, formats: Sequence[str]) -> None:
    if budget.max_bytes is not None and size.min(axis=1).sum() > budget.max_bytes:
        raise ConfigError(
            f"budget of {budget.max_bytes / 2**20:.2f} MB is below the smallest plan "
            f"({size.min(axis=1).sum() / 2**20:.2f} MB with formats {', '.join(formats)})"
        )
    if budget.max_us is not None and lat.min(axis=1).sum() > budget.max_us:
        raise ConfigError(
            f"latency budget of {budget.max_us / 1e3:.2f} ms/token is below the fastest plan "
            f"({lat.min(axis=1).sum() / 1e3:.2f} ms/token of linear layers)"
        )


def _result(units, formats, pick, kl, size, lat, solver) -> Allocation:
    idx = np.arange(len(units))
    choice = {u.name: formats[int(j)] for u, j in zip(units, pick, strict=True)}
    overrides = {m: choice[u.name] for u in units for m in u.members}
    return Allocation(choice=choice, loss=float(kl[idx, pick].sum()), bytes=int(size[idx, pick].sum()),
                      us=float(lat[idx, pick].sum()), solver=solver, plan_overrides=overrides)
