"""HAQ's RL search against the exact MILP on the same problem: never better (the MILP is exact, so a lower
loss would expose a bug in one of them), always within budget, and on tiny problems it finds the optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgellm.compress.allocator import Budget, allocate
from edgellm.compress.rl_search import (
    RLConfig,
    _options,
    _problem,
    compare_with_milp,
    degrade_to_budget,
    rl_search,
)
from edgellm.compress.units import Unit
from edgellm.errors import ConfigError, UnknownNameError

FORMATS = ("int2", "int4-sym", "int8")  # 4, 5 and 9 bits per weight
FAST = {"hidden": (64, 64), "batch_size": 32}


def _units(n: int, shapes=((64, 64),)) -> list[Unit]:
    roles = ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")
    return [Unit(f"blk.{i // 4}.{roles[i % 4]}", i // 4, roles[i % 4], (f"blk.{i // 4}.{roles[i % 4]}",),
                 *shapes[i % len(shapes)]) for i in range(n)]


def _bytes(units, fmt) -> int:
    from edgellm.compress.plan import QUANT_FORMATS

    return sum(QUANT_FORMATS[fmt].nbytes(u.k, u.n) for u in units)


def _brute_force(units, loss, max_bytes):
    from edgellm.compress.plan import QUANT_FORMATS

    best = None
    for combo in itertools.product(FORMATS, repeat=len(units)):
        size = sum(QUANT_FORMATS[f].nbytes(u.k, u.n) for u, f in zip(units, combo, strict=True))
        if size <= max_bytes:
            total = sum(loss[u.name][f] for u, f in zip(units, combo, strict=True))
            best = total if best is None else min(best, total)
    return best


def test_known_optimum_rl_never_beats_milp_and_meets_the_budget():
    """Budget = every unit at 5 bits; one 9-bit unit would need four 4-bit ones, and 4 bits cost 10 nats
    while 5 bits cost at most 1: the optimum is all int4-sym, loss = sum of those losses."""
    rng = np.random.default_rng(3)
    us = _units(12)
    loss = {u.name: {"int2": 10.0, "int4-sym": float(rng.uniform(0.1, 1.0)), "int8": 0.0} for u in us}
    budget = Budget(max_bytes=_bytes(us, "int4-sym"))
    known = sum(v["int4-sym"] for v in loss.values())
    cmp = compare_with_milp(us, FORMATS, loss, budget, config=RLConfig(episodes=25, warmup=5, **FAST))
    assert cmp.milp.loss == pytest.approx(known, rel=1e-12)
    assert cmp.rl.allocation.loss >= cmp.milp.loss * (1 - 1e-12)
    assert cmp.rl.allocation.bytes <= budget.max_bytes
    assert cmp.gap >= 0 and cmp.rl.seconds > 0 and cmp.milp_seconds > 0
    assert cmp.rl.history == sorted(cmp.rl.history, reverse=True)  # best-so-far never gets worse


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_problems_rl_within_budget_and_never_below_milp(seed):
    rng = np.random.default_rng(seed)
    us = _units(8, shapes=((64, 64), (64, 192), (128, 64)))
    loss = {u.name: dict(zip(FORMATS, sorted(rng.exponential(1.0, 3), reverse=True), strict=True)) for u in us}
    budget = Budget(max_bytes=int(_bytes(us, "int4-sym") * rng.uniform(0.9, 1.4)))
    rl = rl_search(us, FORMATS, loss, budget, config=RLConfig(episodes=40, seed=seed, **FAST))
    milp = allocate(us, FORMATS, loss, budget)
    assert rl.allocation.bytes <= budget.max_bytes
    assert rl.allocation.loss >= milp.loss * (1 - 1e-12), (rl.allocation.loss, milp.loss)


def test_rl_finds_the_optimum_of_a_tiny_problem():
    """4 units x 3 formats (81 plans): the brute-force optimum, which the MILP also finds."""
    rng = np.random.default_rng(7)
    us = _units(4, shapes=((64, 64), (64, 128)))
    loss = {u.name: dict(zip(FORMATS, sorted(rng.exponential(1.0, 3), reverse=True), strict=True)) for u in us}
    budget = Budget(max_bytes=int(_bytes(us, "int4-sym") * 1.3))
    optimum = _brute_force(us, loss, budget.max_bytes)
    assert allocate(us, FORMATS, loss, budget).loss == pytest.approx(optimum)
    result = rl_search(us, FORMATS, loss, budget, config=RLConfig(episodes=150, warmup=10, **FAST))
    assert result.allocation.loss == pytest.approx(optimum), (result.allocation.loss, optimum)
    assert result.best_episode < 150


def test_rl_search_is_seeded():
    rng = np.random.default_rng(5)
    us = _units(6)
    loss = {u.name: dict(zip(FORMATS, sorted(rng.exponential(1.0, 3), reverse=True), strict=True)) for u in us}
    budget = Budget(max_bytes=_bytes(us, "int4-sym"))
    runs = [rl_search(us, FORMATS, loss, budget, config=RLConfig(episodes=30, seed=11, **FAST)) for _ in range(2)]
    assert runs[0].episode_loss == runs[1].episode_loss


def test_haq_degrade_rule_steps_down_from_the_last_unit():
    us = _units(3)
    loss = {u.name: {"int2": 3.0, "int4-sym": 1.0, "int8": 0.0} for u in us}
    kl, size, lat = _options(us, FORMATS, loss, None)
    per = _bytes(us[:1], "int8"), _bytes(us[:1], "int4-sym"), _bytes(us[:1], "int2")
    problem = _problem(kl, size, lat, Budget(max_bytes=per[0] + 2 * per[1]))  # one int8, two int4-sym
    assert [FORMATS[j] for j in problem.order] == ["int2", "int4-sym", "int8"]
    # all int8 -> last unit down one step, then the middle one, then it fits: (int8, int4-sym, int4-sym)
    np.testing.assert_array_equal(degrade_to_budget(problem, np.array([2, 2, 2])), [2, 1, 1])


def test_latency_budget_and_bad_input():
    us = _units(4)
    loss = {u.name: {"int2": 3.0, "int4-sym": 1.0, "int8": 0.0} for u in us}
    lat = {"int2": 12.0, "int4-sym": 8.0, "int8": 10.0}  # as measured on cpu-ort: int2 is the slowest

    def cost(u, f):
        return lat[f]

    result = rl_search(us, FORMATS, loss, Budget(max_us=38.0), cost_us=cost, config=RLConfig(episodes=30, **FAST))
    assert result.allocation.us <= 38.0
    assert result.allocation.loss >= allocate(us, FORMATS, loss, Budget(max_us=38.0), cost_us=cost).loss
    with pytest.raises(ConfigError, match="latency budget needs the target's cost table"):
        rl_search(us, FORMATS, loss, Budget(max_us=38.0))
    with pytest.raises(ConfigError, match="below the smallest plan"):
        rl_search(us, FORMATS, loss, Budget(max_bytes=10))
    with pytest.raises(ConfigError, match="warmup"):
        RLConfig(episodes=10, warmup=10)


def test_solver_registry_and_recipe_parameter():
    from edgellm.compress.recipe import parse_recipe
    from edgellm.compress.solvers import solve

    us = _units(4, shapes=((512, 512),))  # the dp solver's 4096-byte buckets divide these sizes
    loss = {u.name: {"int2": 3.0, "int4-sym": 1.0, "int8": 0.0} for u in us}
    budget = Budget(max_bytes=_bytes(us, "int4-sym"))
    assert solve("dp", us, FORMATS, loss, budget).loss == solve("milp", us, FORMATS, loss, budget).loss == 4.0
    with pytest.raises(UnknownNameError, match="unknown allocation solver 'anneal'; valid allocation solvers: dp, milp, rl"):
        solve("anneal", us, FORMATS, loss, budget)
    with pytest.raises(ConfigError, match="size budgets only"):
        solve("dp", us, FORMATS, loss, Budget(max_us=1.0), cost_us=lambda u, f: 0.1)
    recipe = parse_recipe({"name": "x", "passes": [{"pass": "allocate", "solver": "rl", "episodes": 50}]}, "inline")
    assert recipe.passes[0].params.solver == "rl"
    with pytest.raises(ConfigError, match="solver 'anneal' \\(valid: milp, dp, rl\\)"):
        parse_recipe({"name": "x", "passes": [{"pass": "allocate", "solver": "anneal"}]}, "inline")


def test_allocate_pass_runs_the_rl_solver_on_a_tiny_model(tmp_path):
    from edgellm.compress.passes import CompressState
    from edgellm.compress.pipeline import run_recipe
    from edgellm.compress.plan import CompressionPlan
    from edgellm.compress.recipe import parse_recipe
    from edgellm.compress.units import units
    from edgellm.model.loader import load_model
    from tests.tiny_gguf import write_tiny_gguf

    model = load_model(write_tiny_gguf(tmp_path / "t.gguf", hidden=128, ffn=256, qtype="Q4_1"))
    linear = sum(u.n_weights for u in units(model.config))
    reports = {}
    for solver in ("milp", "rl"):
        recipe = parse_recipe({"name": solver, "passes": [{
            "pass": "allocate", "formats": ["auto", "int4-sym", "int3-sym-g128", "int2-g128"], "tokens": 64,
            "window": 32, "solver": solver, "episodes": 20}]}, "inline")
        state = CompressState(model=model, plan=CompressionPlan(), budget_bytes=int(linear * 3.5 / 8),
                              cache_dir=tmp_path / "cache")
        run_recipe(state, recipe)
        reports[solver] = state.report["allocate"]
        assert state.report["allocate"]["linear_bytes"] <= int(linear * 3.5 / 8)
    assert reports["rl"]["solver"].startswith("rl (HAQ DDPG")
    assert reports["rl"]["predicted_kl"] >= reports["milp"]["predicted_kl"] * (1 - 1e-12)
