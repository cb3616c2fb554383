"""Allocation solvers by name, so a recipe's allocate pass can choose one (`solver = "milp"`).

    milp  exact mixed-integer program (HiGHS), size and/or latency budgets   edgellm.compress.allocator
    dp    exact dynamic program over size buckets (size budgets only)         edgellm.compress.allocator
    rl    HAQ's DDPG reinforcement-learning search (best plan it finds)       edgellm.compress.rl_search
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from edgellm.compress.allocator import Allocation, Budget
from edgellm.compress.units import Unit
from edgellm.errors import ConfigError, unknown_name

Solver = Callable[..., Allocation]


def _milp(units, formats, loss, budget: Budget, cost_us, seed: int, episodes: int, progress: bool) -> Allocation:
    from edgellm.compress.allocator import allocate

    return allocate(units, formats, loss, budget, cost_us)


def _dp(units, formats, loss, budget: Budget, cost_us, seed: int, episodes: int, progress: bool) -> Allocation:
    from edgellm.compress.allocator import allocate_dp

    if budget.max_us is not None or budget.max_bytes is None:
        raise ConfigError("the dp solver handles size budgets only; use solver = \"milp\" or \"rl\" for latency")
    return allocate_dp(units, formats, loss, budget.max_bytes)


def _rl(units, formats, loss, budget: Budget, cost_us, seed: int, episodes: int, progress: bool) -> Allocation:
    from edgellm.compress.rl_search import RLConfig, rl_search

    config = RLConfig(episodes=episodes, warmup=min(20, episodes // 4), seed=seed)  # HAQ: 20 of 600 episodes
    return rl_search(units, formats, loss, budget, cost_us, config, progress).allocation


SOLVERS: dict[str, Solver] = {"milp": _milp, "dp": _dp, "rl": _rl}


def solve(solver: str, units: Sequence[Unit], formats: Sequence[str], loss: Mapping[str, Mapping[str, float]],
          budget: Budget, cost_us: Callable[[Unit, str], float] | None = None, seed: int = 0, episodes: int = 300,
          progress: bool = False) -> Allocation:
    """One format per unit minimising the summed predicted loss under `budget`, by the named solver."""
    if solver not in SOLVERS:
        raise unknown_name("allocation solver", solver, list(SOLVERS))
    return SOLVERS[solver](units, formats, loss, budget, cost_us, seed, episodes, progress)
