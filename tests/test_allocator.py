"""The allocator against brute force and an independent DP, and its budget errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgellm.compress.allocator import Budget, allocate, allocate_dp
from edgellm.compress.units import Unit, format_bytes, units
from edgellm.errors import ConfigError
from edgellm.model.config import ModelConfig

FORMATS = ("int8", "int4", "int4-sym", "int2")


def toy(n_units: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    us = [Unit(f"blk.{i}.ffn_down", i, "ffn_down", (f"blk.{i}.ffn_down",), 64 * (1 + i % 3), 64) for i in range(n_units)]
    # lower bits hurt more, with per-unit sensitivity
    scale = rng.uniform(0.5, 2.0, n_units)
    loss = {u.name: {"int8": 1e-4 * s, "int4": 1e-3 * s, "int4-sym": 3e-3 * s, "int2": 5e-2 * s}
            for u, s in zip(us, scale, strict=True)}
    lat = {f: c for f, c in zip(FORMATS, (10.0, 12.0, 8.0, 15.0), strict=True)}
    return us, loss, (lambda u, f: lat[f] * u.k / 64)


def brute_force(us, loss, max_bytes, cost=None, max_us=None):
    best = None
    for combo in itertools.product(FORMATS, repeat=len(us)):
        size = sum(format_bytes(f, u.k, u.n) for u, f in zip(us, combo, strict=True))
        lat = sum(cost(u, f) for u, f in zip(us, combo, strict=True)) if cost else 0
        if size > max_bytes or (max_us is not None and lat > max_us):
            continue
        total = sum(loss[u.name][f] for u, f in zip(us, combo, strict=True))
        if best is None or total < best - 1e-12:
            best = total
    return best


@pytest.mark.parametrize("fraction", [0.46, 0.5, 0.7, 1.0])
def test_milp_equals_brute_force_under_a_size_budget(fraction):
    us, loss, _ = toy()
    largest = sum(format_bytes("int8", u.k, u.n) for u in us)
    budget = int(largest * fraction)
    result = allocate(us, FORMATS, loss, Budget(max_bytes=budget))
    assert result.bytes <= budget
    assert result.loss == pytest.approx(brute_force(us, loss, budget), rel=1e-9)


def test_latency_and_size_budgets_together():
    us, loss, cost = toy()
    max_bytes = int(sum(format_bytes("int4", u.k, u.n) for u in us) * 1.2)
    max_us = sum(cost(u, "int4") for u in us) * 0.9
    result = allocate(us, FORMATS, loss, Budget(max_bytes=max_bytes, max_us=max_us), cost_us=cost)
    assert result.bytes <= max_bytes and result.us <= max_us + 1e-9
    assert result.loss == pytest.approx(brute_force(us, loss, max_bytes, cost, max_us), rel=1e-9)


def test_dp_agrees_with_milp():
    us, loss, _ = toy(8, seed=3)
    budget = int(sum(format_bytes("int4", u.k, u.n) for u in us) * 0.9)
    dp = allocate_dp(us, FORMATS, loss, budget, granularity=16)
    milp = allocate(us, FORMATS, loss, Budget(max_bytes=budget))
    assert dp.bytes <= budget
    assert dp.loss == pytest.approx(milp.loss, rel=1e-9)


def test_budget_below_every_plan_is_a_clear_error():
    us, loss, cost = toy()
    with pytest.raises(ConfigError, match="below the smallest plan"):
        allocate(us, FORMATS, loss, Budget(max_bytes=10))
    with pytest.raises(ConfigError, match="below the fastest plan"):
        allocate(us, FORMATS, loss, Budget(max_us=1.0), cost_us=cost)
    for max_bytes in (10, -1000):  # negative: a file budget smaller than the tensors every plan keeps
        with pytest.raises(ConfigError, match="below the smallest plan"):
            allocate_dp(us, FORMATS, loss, max_bytes)
    with pytest.raises(ConfigError, match="needs the target's cost table"):
        allocate(us, FORMATS, loss, Budget(max_us=1e9))
    with pytest.raises(ConfigError, match="no sensitivity"):
        allocate(us, ("int8", "fp32"), loss, Budget(max_bytes=10**9))


def test_plan_overrides_cover_every_member_and_keep_fused_groups_together():
    cfg = ModelConfig(architecture="llama", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128,
                      vocab_size=256, context_length=128)
    us = units(cfg)
    loss = {u.name: {"int8": 1e-4, "int4": 1e-3 * (1 + u.layer), "int4-sym": 2e-3, "int2": 1e-1} for u in us}
    budget = sum(format_bytes("int4-sym", u.k, u.n) for u in us) + 5000
    result = allocate(us, FORMATS, loss, Budget(max_bytes=budget))
    assert set(result.plan_overrides) == {m for u in us for m in u.members}
    for u in us:
        assert len({result.plan_overrides[m] for m in u.members}) == 1
