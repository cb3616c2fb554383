"""Where to cut the model: an exact split choice per phase, re-planned live with hysteresis.

The device runs layers [0, K), the server [K, n) plus the head; K = n is all-local, K = 0 all-cloud.
One forward of T tokens at split K costs (Neurosurgeon's model, with the LLM's own wire sizes):

    device [0, K)  +  RTT + (up bytes + down bytes) / bandwidth  +  server [K, n) + head
                      up: T token ids (K = 0) or T float32 hidden states; down: logits or one token id

K = n pays the head on the device and nothing on the wire. Every K in 0..n is priced (n + 1 numbers),
so the choice is exact, not a heuristic. Energy (the device's only) is power x time per state:
compute while the device runs its layers, transmit while bytes are on the wire, idle while it waits
for the round trip and the server.

Prefill and decode may cut differently: the plan for a generation minimises, over every (K_prefill,
K_decode) pair, prefill(K_p) + move(K_p -> K_d) + expected decode tokens x decode(K_d), where a move
is the one-off price of the KV of the layers that change sides (transfer them, or recompute them from
the token history, whichever is cheaper).

Between decode tokens the planner re-prices every split with the live network estimate and switches
only when another split beats the current one by a margin (relative and absolute, after amortising
the move over the tokens left) for `patience` consecutive tokens: a noisy estimate around a break-even
point does not flap, a real change is followed within a few tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

from edgellm.compress.target import EnergyModel
from edgellm.errors import ConfigError
from edgellm.offload.network import NetworkEstimate
from edgellm.offload.profile import ActivationSizes, LayerProfile

log = logging.getLogger(__name__)
Objective = Literal["latency", "energy"]
OBJECTIVES = ("latency", "energy")


@dataclass(frozen=True)
class History:
    """How the cached positions were computed (recompute replays the same chunks, for exactness)."""

    chunked_tokens: int = 0  # positions that came in multi-token chunks (prefill)
    single_tokens: int = 0  # positions that came one at a time (decode)
    multi_chunks: int | None = None  # how many multi-token chunks (None: one if chunked_tokens else none)

    @property
    def positions(self) -> int:
        return self.chunked_tokens + self.single_tokens

    @property
    def chunks(self) -> int:
        """forward() calls a replay makes: one round trip each when it replays on the server."""
        multi = (1 if self.chunked_tokens else 0) if self.multi_chunks is None else self.multi_chunks
        return multi + self.single_tokens


@dataclass(frozen=True)
class CostModel:
    """Everything a split's price depends on except the network (which moves)."""

    device: LayerProfile
    server: LayerProfile
    sizes: ActivationSizes
    energy: EnergyModel | None = None
    token_only: bool = False  # greedy without penalties: the server answers one token id, not logits
    device_scale: float = 1.0  # live corrections: measured / predicted compute on each side
    server_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.device.n_layers != self.server.n_layers:
            raise ConfigError(f"device profile has {self.device.n_layers} layers, the server's "
                              f"{self.server.n_layers}; they must describe the same model")

    @property
    def n_layers(self) -> int:
        return self.device.n_layers

    def replay_ms(self, side: Literal["device", "server"], start: int, stop: int, history: History) -> float:
        """Replaying [start, stop) over a token history in its original chunks (an exact recompute);
        a range that ends at the last layer also runs the head once per chunk."""
        p = self.device if side == "device" else self.server
        scale = self.device_scale if side == "device" else self.server_scale
        ms = p.layers_ms(start, stop, history.chunked_tokens, prefill=True) + p.layers_ms(start, stop,
                                                                                           history.single_tokens)
        if stop == self.n_layers:
            ms += p.head_ms * history.chunks
        return scale * ms


@dataclass(frozen=True)
class SplitCost:
    """Predicted price of one forward at one split, by part (ms; energy in mJ = W x ms)."""

    split: int
    device_ms: float
    rtt_ms: float
    transfer_ms: float
    server_ms: float
    energy_mj: float
    round_trips: int = 0
    wire_bytes: int = 0

    @property
    def latency_ms(self) -> float:
        return self.device_ms + self.rtt_ms + self.transfer_ms + self.server_ms

    def value(self, objective: Objective) -> float:
        return self.latency_ms if objective == "latency" else self.energy_mj


@dataclass(frozen=True)
class MoveCost:
    """One-off price of moving the split with `positions` cached: how, and what it costs."""

    method: str  # none | download | device-recompute | upload | server-recompute
    latency_ms: float
    energy_mj: float

    def value(self, objective: Objective) -> float:
        return self.latency_ms if objective == "latency" else self.energy_mj


NO_MOVE = MoveCost("none", 0.0, 0.0)


def _energy(model: CostModel, compute_ms: float, transmit_ms: float, idle_ms: float) -> float:
    e = model.energy
    if e is None:  # without a power model, energy is proportional to device busy time
        return compute_ms + transmit_ms
    return e.power_compute_w * compute_ms + e.power_transmit_w * transmit_ms + e.power_idle_w * idle_ms


def split_cost(model: CostModel, net: NetworkEstimate, split: int, n_tokens: int = 1,
               prefill: bool = False) -> SplitCost:
    """Price of advancing n_tokens positions (one chunk if prefill, else one decode step each) at `split`."""
    n = model.n_layers
    if not 0 <= split <= n:
        raise ConfigError(f"split {split} is outside 0..{n}")
    steps = 1 if prefill else n_tokens
    per_step_tokens = n_tokens if prefill else 1
    device = model.device_scale * model.device.layers_ms(0, split, n_tokens, prefill)
    if split == n:
        device += model.device_scale * model.device.head_ms * steps
        return SplitCost(split, device, 0.0, 0.0, 0.0, _energy(model, device, 0.0, 0.0))
    wire = model.sizes.uplink_bytes(split, per_step_tokens) + model.sizes.downlink_bytes(model.token_only)
    transfer = net.transfer_ms(wire) * steps
    rtt = net.rtt_ms * steps
    server = model.server_scale * (model.server.layers_ms(split, n, n_tokens, prefill) + model.server.head_ms * steps)
    return SplitCost(split, device, rtt, transfer, server, _energy(model, device, transfer, rtt + server),
                     steps, wire * steps)


def move_cost(model: CostModel, net: NetworkEstimate, old: int, new: int, history: History,
              exact: bool = True, device_replay_from: int = 0, objective: Objective = "latency") -> MoveCost:
    """Cheapest way to move the split from `old` to `new` with `history` positions cached.

    Layers [old, new) join the device: download their KV, or replay the history through [from, new) on
    the device (from = `device_replay_from`: 0, or `old` when the device kept the hidden states at
    layer `old`). Layers [new, old) join the server's live session (old < n): upload their KV, or
    (exact=False) let the server recompute them from the token ids in one batch, which need not match
    the original chunks bit for bit. From all-local (old = n) there is no session to upload into (a v1
    session starts at position 0): open one and replay the token ids into it chunk by chunk.
    """
    n, p, rtt = model.n_layers, history.positions, net.rtt_ms
    if old == new:
        return NO_MOVE
    options: list[MoveCost] = []
    if new > old:  # layers come back to the device
        tail_rtt = rtt if new < n else 0.0  # PATCH the server's remaining range
        kv = net.transfer_ms(model.sizes.kv_bytes(new - old, p))
        options.append(MoveCost("download", rtt + kv + tail_rtt, _energy(model, 0.0, kv, rtt + tail_rtt)))
        replay = model.replay_ms("device", device_replay_from, new, history)
        options.append(MoveCost("device-recompute", replay + tail_rtt, _energy(model, replay, 0.0, tail_rtt)))
    elif old < n:  # layers join the server's live session
        kv = net.transfer_ms(model.sizes.kv_bytes(old - new, p))
        options.append(MoveCost("upload", 2 * rtt + kv, _energy(model, 0.0, kv, 2 * rtt)))  # PUT kv, PATCH
        if not exact:
            ids = net.transfer_ms(model.sizes.token_id_bytes * p)
            idle = rtt + model.replay_ms("server", 0, old, History(chunked_tokens=p))
            options.append(MoveCost("server-recompute", idle + ids, _energy(model, 0.0, ids, idle)))
    else:  # from all-local: open a session at layer 0, replay the ids, then PATCH its start to `new`
        rtts = rtt * (1 + history.chunks + (1 if new > 0 else 0))
        wire = net.transfer_ms(history.chunks * (model.sizes.uplink_bytes(0, 0) + model.sizes.downlink_bytes(True))
                               + model.sizes.token_id_bytes * p)
        server = model.replay_ms("server", 0, n, history)
        options.append(MoveCost("server-replay", rtts + wire + server, _energy(model, 0.0, wire, rtts + server)))
    return min(options, key=lambda m: (m.value(objective), m.latency_ms))


@dataclass(frozen=True)
class PlanConstraints:
    """Splits the plan may use. min_device_layers = 1 keeps raw token ids on the device (privacy);
    max_device_layers bounds device memory; max_latency_ms bounds a decode token under the energy
    objective (when nothing meets it, the fastest allowed split is used)."""

    min_device_layers: int = 0
    max_device_layers: int | None = None
    max_latency_ms: float | None = None

    def allowed(self, n_layers: int, cloud: bool = True) -> list[int]:
        """Splits in order; without the cloud only all-local is left (whatever the memory bound says)."""
        if not cloud:
            return [n_layers]
        top = n_layers if self.max_device_layers is None else min(n_layers, self.max_device_layers)
        splits = list(range(self.min_device_layers, top + 1))
        if not splits:
            raise ConfigError(f"no split satisfies min_device_layers={self.min_device_layers}, "
                              f"max_device_layers={self.max_device_layers} for {n_layers} layers")
        return splits


def best_split(model: CostModel, net: NetworkEstimate, objective: Objective = "latency",
               constraints: PlanConstraints = PlanConstraints(), n_tokens: int = 1, prefill: bool = False,
               cloud: bool = True) -> tuple[int, list[SplitCost]]:
    """The exact best split for one phase, with every allowed split's price (for reports)."""
    costs = [split_cost(model, net, k, n_tokens, prefill) for k in constraints.allowed(model.n_layers, cloud)]
    return _choose(costs, objective, constraints, n_tokens if not prefill else 1).split, costs


def _choose(costs: list[SplitCost], objective: Objective, constraints: PlanConstraints, steps: int) -> SplitCost:
    feasible = costs
    if constraints.max_latency_ms is not None:
        feasible = [c for c in costs if c.latency_ms / steps <= constraints.max_latency_ms] or \
            [min(costs, key=lambda c: c.latency_ms)]
    return min(feasible, key=lambda c: (c.value(objective), c.latency_ms))


@dataclass(frozen=True)
class PhasePlan:
    """Splits for the prefill and for the decode tokens, and the predicted price of the whole run."""

    prefill_split: int
    decode_split: int
    predicted: float  # objective units (ms or mJ) for prefill + move + decode
    move: MoveCost


def plan_generation(model: CostModel, net: NetworkEstimate, prompt_tokens: int, new_tokens: int,
                    objective: Objective = "latency", constraints: PlanConstraints = PlanConstraints(),
                    exact: bool = True, cloud: bool = True) -> PhasePlan:
    """Exact joint choice over every (K_prefill, K_decode) pair, the KV move between them included."""
    splits = constraints.allowed(model.n_layers, cloud)
    prefill = {k: split_cost(model, net, k, prompt_tokens, prefill=True) for k in splits}
    decode = {k: split_cost(model, net, k) for k in splits}
    steps = max(0, new_tokens - 1)  # the first token comes from the prefill's logits
    if constraints.max_latency_ms is not None:
        ok = [k for k in splits if decode[k].latency_ms <= constraints.max_latency_ms]
        decode_splits = ok or [min(splits, key=lambda k: decode[k].latency_ms)]
    else:
        decode_splits = splits
    best: PhasePlan | None = None
    history = History(chunked_tokens=prompt_tokens)
    open_session = {"latency": net.rtt_ms, "energy": _energy(model, 0.0, 0.0, net.rtt_ms)}[objective]
    for kp in splits:
        for kd in decode_splits:
            move = move_cost(model, net, kp, kd, history, exact, objective=objective)
            total = prefill[kp].value(objective) + move.value(objective) + steps * decode[kd].value(objective)
            total += open_session if kp < model.n_layers else 0.0
            if best is None or total < best.predicted - 1e-9:
                best = PhasePlan(kp, kd, total, move)
    assert best is not None  # splits is never empty
    return best


@dataclass(frozen=True)
class PlannerConfig:
    """Objective, constraints and hysteresis of live re-planning."""

    objective: Objective = "latency"
    constraints: PlanConstraints = field(default_factory=PlanConstraints)
    margin: float = 0.05  # relative gain per token another split must show
    min_gain: float = 0.2  # absolute gain per token (ms, or mJ for energy)
    patience: int = 2  # consecutive tokens the gain must persist
    exact: bool = True  # KV moves keep greedy output bit-identical (no server-side batch recompute)
    correction_alpha: float = 0.2  # EWMA weight of measured/predicted compute ratios
    noise_factor: float = 1.0  # the gain must also exceed this many deviations of its network part

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} unknown; valid: {', '.join(OBJECTIVES)}")
        if self.margin < 0 or self.min_gain < 0 or self.patience < 1 or self.noise_factor < 0:
            raise ConfigError(f"hysteresis needs margin >= 0, min_gain >= 0, patience >= 1, noise_factor >= 0; "
                              f"found {self.margin}, {self.min_gain}, {self.patience}, {self.noise_factor}")
        if not 0 < self.correction_alpha <= 1:
            raise ConfigError(f"correction_alpha must be in (0, 1], found {self.correction_alpha}")


@dataclass(frozen=True)
class Decision:
    """What to do before the next decode token."""

    split: int
    move: MoveCost = NO_MOVE
    reason: str = "hold"
    costs: tuple[SplitCost, ...] = ()


class Planner:
    """Stateful re-planner: the cost model, its live corrections, and the hysteresis streak."""

    def __init__(self, model: CostModel, config: PlannerConfig = PlannerConfig()) -> None:
        self.model = model
        self.config = config
        self._streak = 0

    def plan(self, net: NetworkEstimate, prompt_tokens: int, new_tokens: int, cloud: bool = True) -> PhasePlan:
        self._streak = 0
        c = self.config
        return plan_generation(self.model, net, prompt_tokens, new_tokens, c.objective, c.constraints, c.exact, cloud)

    def step(self, net: NetworkEstimate, current: int, history: History, remaining_tokens: int,
             cloud: bool = True, device_replay_from: int = 0) -> Decision:
        """Re-price every split for the next decode token; switch only past the hysteresis."""
        c = self.config
        splits = c.constraints.allowed(self.model.n_layers, cloud)
        costs = [split_cost(self.model, net, k) for k in splits]
        best = _choose(costs, c.objective, c.constraints, 1)
        if current not in splits:  # forced (the cloud is gone, or constraints changed)
            self._streak = 0
            move = move_cost(self.model, net, current, best.split, history, c.exact, device_replay_from,
                             c.objective)
            return Decision(best.split, move, "forced", tuple(costs))
        now = next(x for x in costs if x.split == current)
        if best.split == current:
            self._streak = 0
            return Decision(current, NO_MOVE, "hold", tuple(costs))
        move = move_cost(self.model, net, current, best.split, history, c.exact, device_replay_from,
                             c.objective)
        left = max(1, remaining_tokens)
        gain = now.value(c.objective) - best.value(c.objective) - move.value(c.objective) / left
        noise = c.noise_factor * self._gain_deviation(net, now, best)
        if gain > max(c.margin * now.value(c.objective), c.min_gain, noise):
            self._streak += 1
        else:
            self._streak = 0
        if self._streak >= c.patience:
            self._streak = 0
            return Decision(best.split, move, f"gain {gain:.3g}/token", tuple(costs))
        return Decision(current, NO_MOVE, "hold", tuple(costs))

    def _gain_deviation(self, net: NetworkEstimate, a: SplitCost, b: SplitCost) -> float:
        """Uncertainty of cost(a) - cost(b) from the estimator's: the network terms they do not share (two
        cloud splits share their round trip, so its noise cancels), at the deviation of a smoothed mean."""
        k = net.mean_uncertainty
        rtt = abs(a.round_trips - b.round_trips) * net.rtt_dev_ms * k
        wire = abs(a.wire_bytes - b.wire_bytes) * net.ms_per_byte_dev * k
        if self.config.objective == "energy":
            e = self.model.energy
            return rtt * (e.power_idle_w if e else 0.0) + wire * (e.power_transmit_w if e else 1.0)
        return rtt + wire

    def observe_compute(self, side: Literal["device", "server"], predicted_ms: float, measured_ms: float) -> None:
        """Fold one measured compute time into that side's correction factor (bounded to 0.25..4)."""
        if predicted_ms <= 0 or measured_ms < 0:
            return
        key = f"{side}_scale"
        old = getattr(self.model, key)
        ratio = min(4.0, max(0.25, measured_ms / (predicted_ms / old)))
        a = self.config.correction_alpha
        self.model = replace(self.model, **{key: (1 - a) * old + a * ratio})
