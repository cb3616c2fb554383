"""HAQ's reinforcement-learning search (Wang et al. 2019, "HAQ: Hardware-Aware Automated Quantization with
Mixed Precision"), on the same inputs as the exact allocator: the per-unit sensitivity table, per-unit format
costs (bytes, and microseconds from the target's measured table) and a size and/or latency budget.

As in HAQ (mit-han-lab/haq, `lib/rl/ddpg.py`, `lib/env/linear_quantize_env.py`):

    for each episode:
        for each unit k in order:                       # one step per unit
            s_k = [k, role, K, N, weights, a_{k-1}]      # layer embedding, min-max scaled to [0, 1]
            a_k = actor(s_k) + truncated-normal noise    # continuous in [0, 1]; random during warm-up
            f_k = formats_by_cost[floor(a_k * F)]        # one bin per format, cheapest first
        while over budget:                               # HAQ's rule: degrade precision, last unit first,
            for k from last to first: f_k -= 1 step      # one step at a time, until the budget holds
        reward = -(predicted quality loss) / scale       # the sum of the units' measured KL
        every transition of the episode gets that reward; DDPG updates (critic to r - moving-average
        baseline + Q'(s', actor'(s')), actor up the critic's gradient, soft target updates)

The best plan seen is returned. The exact MILP solves the same objective, so this search can only match
it or be worse: `compare_with_milp` reports the gap and both search times.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgellm.compress.allocator import Allocation, Budget, _check_feasible, _options, _result
from edgellm.compress.units import Unit
from edgellm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLConfig:
    """DDPG hyper-parameters; the defaults are HAQ's (rl_quantize.py) unless noted."""

    episodes: int = 300  # HAQ: 600 training episodes
    warmup: int = 20  # random episodes that only fill the replay buffer (HAQ: 20)
    hidden: tuple[int, int] = (300, 300)  # HAQ: hidden1 = hidden2 = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01  # soft target update
    discount: float = 1.0
    batch_size: int = 64
    replay_episodes: int = 128  # replay buffer, in episodes (HAQ: rmsize 128 per layer)
    noise_init: float = 0.5  # truncated normal sigma (HAQ: init_delta 0.5)
    noise_decay: float = 0.99  # per episode after the warm-up (HAQ: delta_decay 0.99)
    baseline_alpha: float = 0.5  # moving-average reward baseline (HAQ: moving_alpha 0.5)
    updates_per_step: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.warmup < 0 or self.warmup >= self.episodes:
            raise ConfigError(f"need episodes >= 1 and 0 <= warmup < episodes, found episodes={self.episodes} "
                              f"warmup={self.warmup}")
        if self.batch_size < 1 or self.replay_episodes < 1:
            raise ConfigError(f"need batch_size >= 1 and replay_episodes >= 1, found {self.batch_size}, "
                              f"{self.replay_episodes}")
        if not 0 < self.noise_decay <= 1 or self.noise_init < 0:
            raise ConfigError(f"need noise_init >= 0 and 0 < noise_decay <= 1, found {self.noise_init}, "
                              f"{self.noise_decay}")


@dataclass
class RLSearchResult:
    allocation: Allocation
    seconds: float
    best_episode: int  # first episode that reached the returned plan (0-based)
    history: list[float] = field(default_factory=list)  # best predicted loss after each episode
    episode_loss: list[float] = field(default_factory=list)  # each episode's own (post-degrade) loss


@dataclass
class _Problem:
    """The allocator's arrays with formats sorted cheapest first by the budgeted resource."""

    kl: np.ndarray  # (U, F) predicted loss
    size: np.ndarray  # (U, F) bytes
    lat: np.ndarray  # (U, F) microseconds
    order: list[int]  # position in the action scale -> original format index
    budget: Budget

    def fits(self, idx: np.ndarray) -> bool:
        cols = np.asarray(self.order)[idx]
        rows = np.arange(len(idx))
        if self.budget.max_bytes is not None and self.size[rows, cols].sum() > self.budget.max_bytes:
            return False
        return self.budget.max_us is None or self.lat[rows, cols].sum() <= self.budget.max_us + 1e-9

    def loss(self, idx: np.ndarray) -> float:
        return float(self.kl[np.arange(len(idx)), np.asarray(self.order)[idx]].sum())


def _problem(kl: np.ndarray, size: np.ndarray, lat: np.ndarray, budget: Budget) -> _Problem:
    # one resource scale for the action: the budgeted resources, each as a fraction of its budget
    cost = np.zeros(kl.shape[1])
    if budget.max_bytes is not None:
        cost += size.sum(axis=0) / budget.max_bytes
    if budget.max_us is not None:
        cost += lat.sum(axis=0) / budget.max_us
    order = sorted(range(kl.shape[1]), key=lambda j: (cost[j], kl[:, j].sum()))
    return _Problem(kl, size, lat, order, budget)


def degrade_to_budget(problem: _Problem, idx: np.ndarray) -> np.ndarray:
    """HAQ's `_final_action_wall`: while over budget, walk the units from the last to the first, moving
    each one step down the cost scale, and stop as soon as the budget holds."""
    idx = idx.copy()
    while not problem.fits(idx) and idx.any():
        for k in range(len(idx) - 1, -1, -1):
            if idx[k] > 0:
                idx[k] -= 1
                if problem.fits(idx):
                    break
    return idx


def _embedding(units: Sequence[Unit]) -> np.ndarray:
    """HAQ's layer embedding without the conv-only features: index, role, K, N, log #weights (scaled to
    [0, 1] per column); the previous action is appended at each step."""
    roles = sorted({u.role for u in units})
    rows = [[i, roles.index(u.role), u.k, u.n, math.log(u.n_weights)] for i, u in enumerate(units)]
    emb = np.asarray(rows, dtype=np.float64)
    span = emb.max(axis=0) - emb.min(axis=0)
    return ((emb - emb.min(axis=0)) / np.where(span > 0, span, 1.0)).astype(np.float32)


class _Adam:
    """Adam (Kingma & Ba), as torch.optim.Adam computes it; written out because importing torch.optim
    pulls in torch._dynamo, ~4 s per process on this machine, longer than a small search."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.torch, self.lr, self.betas, self.eps, self.t = torch, lr, betas, eps, 0
        self.params = list(params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        torch, (b1, b2) = self.torch, self.betas
        self.t += 1
        grads = [p.grad for p in self.params]
        with torch.no_grad():
            torch._foreach_lerp_(self.m, grads, 1 - b1)  # m <- b1 m + (1 - b1) g
            torch._foreach_mul_(self.v, b2)
            torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)  # v <- b2 v + (1 - b2) g^2
            denom = torch._foreach_sqrt(self.v)
            torch._foreach_div_(denom, math.sqrt(1 - b2**self.t))
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(self.params, self.m, denom, value=-self.lr / (1 - b1**self.t))


class _Agent:
    """DDPG actor/critic (HAQ's architecture: two hidden layers, sigmoid actor, state/action merged in the
    critic's first layer)."""

    def __init__(self, state_dim: int, cfg: RLConfig) -> None:
        import torch
        from torch import nn

        self.torch, self.cfg = torch, cfg
        h1, h2 = cfg.hidden

        def actor() -> nn.Module:
            return nn.Sequential(nn.Linear(state_dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                                 nn.Linear(h2, 1), nn.Sigmoid())

        class Critic(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fs, self.fa = nn.Linear(state_dim, h1), nn.Linear(1, h1)
                self.rest = nn.Sequential(nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1))

            def forward(self, s, a):
                return self.rest(self.fs(s) + self.fa(a))

        with torch.random.fork_rng():  # seeded initial weights without touching the caller's torch RNG
            torch.manual_seed(cfg.seed)
            self.actor, self.actor_target = actor(), actor()
            self.critic, self.critic_target = Critic(), Critic()
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.opt_actor = _Adam(self.actor.parameters(), cfg.lr_actor)
        self.opt_critic = _Adam(self.critic.parameters(), cfg.lr_critic)
        self.pairs = [(list(n.parameters()), list(t.parameters()))
                      for n, t in ((self.actor, self.actor_target), (self.critic, self.critic_target))]
        self.baseline: float | None = None

    def act(self, state: np.ndarray) -> float:
        with self.torch.no_grad():
            return float(self.actor(self.torch.from_numpy(state[None]))[0, 0])

    def update(self, s, a, r, s2, done) -> None:
        torch, cfg = self.torch, self.cfg
        mean_r = float(r.mean())
        self.baseline = mean_r if self.baseline is None else (
            self.baseline + cfg.baseline_alpha * (mean_r - self.baseline))
        s, a, s2 = (torch.from_numpy(x) for x in (s, a, s2))
        r = torch.from_numpy(r - self.baseline)
        with torch.no_grad():
            target = r + cfg.discount * torch.from_numpy(1.0 - done) * self.critic_target(s2, self.actor_target(s2))
        critic_loss = torch.nn.functional.mse_loss(self.critic(s, a), target)
        self.opt_critic.zero_grad()
        critic_loss.backward()
        self.opt_critic.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.opt_actor.zero_grad()
        actor_loss.backward()
        self.opt_actor.step()
        with torch.no_grad():  # soft target update: target <- (1 - tau) target + tau online
            for online, target in self.pairs:
                torch._foreach_lerp_(target, online, cfg.tau)


class _Replay:
    def __init__(self, capacity: int, state_dim: int) -> None:
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.s2 = np.zeros_like(self.s)
        self.a = np.zeros((capacity, 1), np.float32)
        self.r = np.zeros((capacity, 1), np.float32)
        self.done = np.zeros((capacity, 1), np.float32)
        self.n = self.at = 0

    def add(self, s, a, r, s2, done) -> None:
        i = self.at
        self.s[i], self.a[i, 0], self.r[i, 0], self.s2[i], self.done[i, 0] = s, a, r, s2, done
        self.at = (self.at + 1) % len(self.s)
        self.n = min(self.n + 1, len(self.s))

    def sample(self, rng: np.random.Generator, batch: int):
        i = rng.integers(0, self.n, size=batch)
        return self.s[i], self.a[i], self.r[i], self.s2[i], self.done[i]


def _noisy(rng: np.random.Generator, mu: float, sigma: float) -> float:
    """A sample of N(mu, sigma) truncated to [0, 1] (HAQ: scipy truncnorm); rejection keeps it exact."""
    if sigma <= 0:
        return mu
    for _ in range(1000):
        x = rng.normal(mu, sigma)
        if 0.0 <= x <= 1.0:
            return float(x)
    return float(np.clip(mu, 0.0, 1.0))


def _rollout(agent: _Agent, emb: np.ndarray, rng: np.random.Generator, sigma: float | None):
    """One episode's states and actions, unit by unit (state = embedding + previous action); uniform
    random actions while `sigma` is None (warm-up), else the actor's plus truncated-normal noise."""
    states, actions, prev = [], [], 0.0
    for row in emb:
        s = np.append(row, prev).astype(np.float32)
        a = float(rng.uniform()) if sigma is None else _noisy(rng, agent.act(s), sigma)
        states.append(s)
        actions.append(a)
        prev = a
    return states, actions


def _learn(agent: _Agent, replay: _Replay, rng: np.random.Generator, states, actions, reward: float,
           update: bool) -> None:
    """HAQ: every transition of the episode gets the episode's reward; one DDPG update per transition."""
    n = len(states)
    for k in range(n):
        replay.add(states[k], actions[k], reward, states[min(k + 1, n - 1)], float(k == n - 1))
        if update and replay.n >= agent.cfg.batch_size:
            for _ in range(agent.cfg.updates_per_step):
                agent.update(*replay.sample(rng, agent.cfg.batch_size))


def rl_search(units: Sequence[Unit], formats: Sequence[str], loss: Mapping[str, Mapping[str, float]],
              budget: Budget, cost_us: Callable[[Unit, str], float] | None = None,
              config: RLConfig | None = None, progress: bool = False) -> RLSearchResult:
    """Search per-unit formats with HAQ's DDPG agent; returns the best plan that meets the budget."""
    import torch

    cfg = config or RLConfig()
    if budget.max_us is not None and cost_us is None:
        raise ConfigError("a latency budget needs the target's cost table")
    kl, size, lat = _options(units, formats, loss, cost_us)
    _check_feasible(budget, size, lat, formats)
    problem = _problem(kl, size, lat, budget)
    n_u, n_f = kl.shape
    bottom = degrade_to_budget(problem, np.zeros(n_u, dtype=np.int64))
    if not problem.fits(bottom):  # the cheapest end of the scale misses a budget another plan meets
        raise ConfigError("the RL search's cost scale cannot reach the budget (size and latency disagree on "
                          "which formats are cheap); use the milp solver")
    scale = max(problem.loss(bottom), 1e-12)  # rewards in units of the cheapest plan's loss
    emb = _embedding(units)
    state_dim = emb.shape[1] + 1
    rng = np.random.default_rng(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    started = time.perf_counter()
    try:
        agent = _Agent(state_dim, cfg)
        replay = _Replay(cfg.replay_episodes * n_u, state_dim)
        best_idx, best_loss, best_episode = bottom, problem.loss(bottom), -1
        history: list[float] = []
        episode_loss: list[float] = []
        episodes = range(cfg.episodes)
        if progress:
            from tqdm import tqdm

            episodes = tqdm(episodes, desc="rl search", unit="episode")
        for ep in episodes:
            sigma = cfg.noise_init * cfg.noise_decay ** max(0, ep - cfg.warmup)
            states, actions = _rollout(agent, emb, rng, None if ep < cfg.warmup else sigma)
            idx = np.minimum((np.asarray(actions) * n_f).astype(np.int64), n_f - 1)  # one bin per format
            idx = degrade_to_budget(problem, idx)
            ep_loss = problem.loss(idx)
            if ep_loss < best_loss - 1e-15:
                best_idx, best_loss, best_episode = idx, ep_loss, ep
            _learn(agent, replay, rng, states, actions, -ep_loss / scale, update=ep >= cfg.warmup)
            history.append(best_loss)
            episode_loss.append(ep_loss)
            if progress:
                episodes.set_postfix(best=f"{best_loss:.4g}", noise=f"{sigma:.3f}")
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    pick = np.asarray(problem.order)[best_idx]
    alloc = _result(units, formats, pick, kl, size, lat, f"rl (HAQ DDPG, {cfg.episodes} episodes, seed {cfg.seed})")
    return RLSearchResult(alloc, seconds, max(best_episode, 0), history, episode_loss)


@dataclass
class SolverComparison:
    budget: Budget
    milp: Allocation
    milp_seconds: float
    rl: RLSearchResult

    @property
    def gap(self) -> float:
        """RL's predicted loss relative to the optimum (0 = found it)."""
        return self.rl.allocation.loss / self.milp.loss - 1 if self.milp.loss > 0 else float(self.rl.allocation.loss > 0)

    def to_dict(self) -> dict:
        return {"max_bytes": self.budget.max_bytes, "max_us": self.budget.max_us,
                "milp_loss": self.milp.loss, "milp_seconds": self.milp_seconds, "milp_bytes": self.milp.bytes,
                "rl_loss": self.rl.allocation.loss, "rl_seconds": self.rl.seconds, "rl_bytes": self.rl.allocation.bytes,
                "rl_best_episode": self.rl.best_episode, "gap": self.gap}


def compare_with_milp(units: Sequence[Unit], formats: Sequence[str], loss: Mapping[str, Mapping[str, float]],
                      budget: Budget, cost_us: Callable[[Unit, str], float] | None = None,
                      config: RLConfig | None = None, progress: bool = False) -> SolverComparison:
    """Both searches on one problem: objective (predicted loss) and wall time of each."""
    from edgellm.compress.allocator import allocate

    t = time.perf_counter()
    milp = allocate(units, formats, loss, budget, cost_us)
    milp_seconds = time.perf_counter() - t
    rl = rl_search(units, formats, loss, budget, cost_us, config, progress)
    if rl.allocation.loss < milp.loss * (1 - 1e-9) - 1e-12:
        raise RuntimeError(f"RL found loss {rl.allocation.loss} below the exact optimum {milp.loss}: "
                             "one of the two solvers is wrong")
    return SolverComparison(budget, milp, milp_seconds, rl)
