"""Planner and network estimator: exact choice vs brute force, energy objective, hysteresis, convergence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgellm.compress.target import EnergyModel
from edgellm.errors import ConfigError
from edgellm.offload.network import EstimatorConfig, NetworkEstimate, NetworkEstimator
from edgellm.offload.planner import (
    CostModel,
    History,
    PlanConstraints,
    Planner,
    PlannerConfig,
    best_split,
    move_cost,
    plan_generation,
    split_cost,
)
from edgellm.offload.profile import ActivationSizes, LayerProfile, energy_model

N_LAYERS = 30
SIZES = ActivationSizes(hidden_size=576, vocab_size=49152, kv_values_per_token_per_layer=192)


def _model(device_ms=2.0, server_ms=0.5, device_head=10.0, server_head=2.5, token_only=True, energy=None,
           n=N_LAYERS) -> CostModel:
    dev = LayerProfile.uniform(n, device_ms, device_ms / 4, device_head)
    srv = LayerProfile.uniform(n, server_ms, server_ms / 4, server_head)
    return CostModel(dev, srv, SIZES, energy, token_only)


def _random_model(rng: np.random.Generator, energy: EnergyModel | None = None) -> CostModel:
    n = int(rng.integers(1, 12))

    def profile() -> LayerProfile:
        dec = rng.uniform(0.05, 5.0, n)
        return LayerProfile(tuple(dec), tuple(dec * rng.uniform(0.05, 1.0, n)), float(rng.uniform(0.1, 20)))

    sizes = ActivationSizes(int(rng.integers(8, 4096)), int(rng.integers(100, 200_000)), int(rng.integers(8, 1024)))
    return CostModel(profile(), profile(), sizes, energy, bool(rng.integers(0, 2)))


def _hand_cost(m: CostModel, net: NetworkEstimate, k: int) -> float:
    """One decode token's latency at split k, written out independently of planner.split_cost."""
    n = m.n_layers
    if k == n:
        return sum(m.device.layer_ms_decode) + m.device.head_ms
    up = 16 + (4 if k == 0 else 4 * m.sizes.hidden_size)
    down = 16 + (4 if m.token_only else 4 * m.sizes.vocab_size)
    return (sum(m.device.layer_ms_decode[:k]) + net.rtt_ms + (up + down) * 8e-3 / net.bandwidth_mbps
            + sum(m.server.layer_ms_decode[k:]) + m.server.head_ms)


def test_split_choice_is_exact_vs_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = _random_model(rng)
        net = NetworkEstimate.fixed(float(rng.uniform(0.5, 300)), float(rng.uniform(0.5, 2000)))
        k, costs = best_split(m, net)
        brute = [_hand_cost(m, net, j) for j in range(m.n_layers + 1)]
        assert [c.latency_ms for c in costs] == pytest.approx(brute, rel=1e-9)
        assert brute[k] == pytest.approx(min(brute), rel=1e-12), f"chose {k}: {brute}"


def test_joint_phase_plan_is_exact_over_all_pairs():
    rng = np.random.default_rng(1)
    for _ in range(60):
        m = _random_model(rng, EnergyModel(8.0, 2.0, 3.0, "test"))
        net = NetworkEstimate.fixed(float(rng.uniform(1, 200)), float(rng.uniform(1, 1000)))
        prompt, new = int(rng.integers(1, 300)), int(rng.integers(1, 200))
        for objective in ("latency", "energy"):
            plan = plan_generation(m, net, prompt, new, objective)
            n = m.n_layers
            totals = {}
            for kp, kd in itertools.product(range(n + 1), repeat=2):
                mv = move_cost(m, net, kp, kd, History(chunked_tokens=prompt), objective=objective)
                opening = split_cost(m, net, 0).rtt_ms if kp < n else 0.0  # one round trip opens the session
                if objective == "energy":
                    opening *= m.energy.power_idle_w
                totals[kp, kd] = (split_cost(m, net, kp, prompt, prefill=True).value(objective) + mv.value(objective)
                                  + (new - 1) * split_cost(m, net, kd).value(objective) + opening)
            assert plan.predicted == pytest.approx(min(totals.values()), rel=1e-9)
            assert totals[plan.prefill_split, plan.decode_split] == pytest.approx(plan.predicted, rel=1e-9)


def test_extremes_and_constraints():
    m = _model()
    fast = NetworkEstimate.fixed(1.0, 1000.0)
    slow = NetworkEstimate.fixed(200.0, 1.0)
    assert best_split(m, fast)[0] == 0  # a fast server behind a fast link: all-cloud
    assert best_split(m, slow)[0] == N_LAYERS  # a slow link: all-local
    private = PlanConstraints(min_device_layers=1)
    assert best_split(m, fast, constraints=private)[0] == 1  # token ids never leave the device
    small = PlanConstraints(max_device_layers=10)
    assert best_split(m, slow, constraints=small)[0] <= 10
    with pytest.raises(ConfigError, match="no split"):
        PlanConstraints(min_device_layers=5, max_device_layers=3).allowed(N_LAYERS)
    assert PlanConstraints(max_device_layers=3).allowed(N_LAYERS, cloud=False) == [N_LAYERS]


def test_prefill_and_decode_may_split_differently():
    # Logits come back (sampling): decode pays 196 KB per token, prefill pays it once for 200 tokens, and
    # the device's prefill is slow per token: prefill in the cloud, decode at home.
    dev = LayerProfile.uniform(N_LAYERS, 0.5, 2.0, 1.0)
    srv = LayerProfile.uniform(N_LAYERS, 0.5, 0.02, 1.0)
    m = CostModel(dev, srv, SIZES, token_only=False)
    plan = plan_generation(m, NetworkEstimate.fixed(20.0, 20.0), prompt_tokens=200, new_tokens=64)
    assert (plan.prefill_split, plan.decode_split) == (0, N_LAYERS)
    assert plan.move.method in ("download", "device-recompute")


def test_energy_objective_trades_latency_for_device_energy():
    # Equal compute on both sides: locally is faster (no network), but waiting idle costs the device less
    # than computing, so the energy objective offloads.
    power = EnergyModel(power_compute_w=10.0, power_transmit_w=2.0, power_idle_w=1.0, source="test")
    m = _model(device_ms=1.5, server_ms=1.5, device_head=10.0, server_head=10.0, energy=power)
    net = NetworkEstimate.fixed(5.0, 100.0)
    k_lat, costs = best_split(m, net, "latency")
    k_en, _ = best_split(m, net, "energy")
    assert k_lat == N_LAYERS and k_en == 0
    by_split = {c.split: c for c in costs}
    assert by_split[k_en].energy_mj == min(c.energy_mj for c in costs)
    assert by_split[k_en].energy_mj < by_split[k_lat].energy_mj
    # a latency bound the cloud cannot meet keeps energy-minimising within it
    bound = PlanConstraints(max_latency_ms=by_split[N_LAYERS].latency_ms + 1.0)
    assert best_split(m, net, "energy", bound)[0] == N_LAYERS


def test_energy_model_comes_from_targets():
    e = energy_model("rpi5-cortex-a76-ort")
    assert e.power_compute_w > e.power_idle_w > 0 and "not measured" in e.source


def test_move_cost_picks_the_cheaper_way():
    m = _model(token_only=False)
    history = History(chunked_tokens=100, single_tokens=20)
    fast, slow = NetworkEstimate.fixed(2.0, 1000.0), NetworkEstimate.fixed(50.0, 1.0)
    assert move_cost(m, fast, 10, N_LAYERS, history).method == "download"  # 20 layers of KV at 1 Gbit/s
    assert move_cost(m, slow, 10, N_LAYERS, history).method == "device-recompute"
    up = move_cost(m, slow, 20, 0, history)
    assert up.method == "upload"  # exact: no batch recompute on the server
    assert move_cost(m, slow, 20, 0, history, exact=False).method == "server-recompute"
    fresh = move_cost(m, fast, N_LAYERS, 0, history)  # from all-local: a new session, replayed chunk by chunk
    assert fresh.method == "server-replay"
    assert fresh.latency_ms >= (1 + history.chunks) * 2.0
    # replaying from the boundary's kept hidden states is cheaper than from layer 0
    assert move_cost(m, slow, 25, N_LAYERS, history, device_replay_from=25).latency_ms < \
        move_cost(m, slow, 25, N_LAYERS, history).latency_ms


class LinkSimulator:
    """Feeds an estimator what real requests on a link of (rtt, bandwidth) would report, with noise."""

    def __init__(self, model: CostModel, estimator: NetworkEstimator, rng: np.random.Generator, noise: float) -> None:
        self.m, self.est, self.rng, self.noise = model, estimator, rng, noise

    def token(self, split: int, rtt_ms: float, mbps: float) -> None:
        jitter = lambda x: x * float(self.rng.lognormal(0.0, self.noise))  # noqa: E731
        rtt = jitter(rtt_ms)
        self.est.observe_rtt(rtt / 1e3)  # the prober's health request
        probe = 1500  # and its capabilities request right after (a sized sample even while all-local)
        self.est.observe(100, probe, jitter(rtt_ms + (probe + 100) * 8e-3 / mbps) / 1e3, rtt_ms=rtt)
        if split < self.m.n_layers:
            up = self.m.sizes.uplink_bytes(split, 1)
            down = self.m.sizes.downlink_bytes(self.m.token_only)
            wall = jitter(rtt_ms + (up + down) * 8e-3 / mbps) + 3.0
            self.est.observe(up, down, wall / 1e3, 3.0 / 1e3)


def _run(planner: Planner, sim: LinkSimulator, links: list[tuple[float, float]], start: int,
         horizon: int = 500) -> list[int]:
    """Decode len(links) tokens (of a generation `horizon` tokens long); the split after each."""
    split, splits = start, []
    history = History(chunked_tokens=32)
    for i, (rtt, mbps) in enumerate(links):
        sim.token(split, rtt, mbps)
        d = planner.step(sim.est.estimate(), split, history, remaining_tokens=horizon - i)
        split = d.split
        history = History(history.chunked_tokens, history.single_tokens + 1)
        splits.append(split)
    return splits


def _break_even_mbps(m: CostModel, rtt_ms: float) -> float:
    lo, hi = 0.01, 10_000.0
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        c = {c.split: c.latency_ms for c in best_split(m, NetworkEstimate.fixed(rtt_ms, mid))[1]}
        lo, hi = (mid, hi) if c[N_LAYERS] < min(c[0], c[1]) else (lo, mid)
    return lo


def test_hysteresis_does_not_flap_on_noisy_estimates():
    m = _model(token_only=False)  # logits back: bandwidth decides between local and cloud
    rtt = 10.0
    even = _break_even_mbps(m, rtt)
    rng = np.random.default_rng(3)
    links = [(rtt, even * float(rng.choice([0.8, 1.25]))) for _ in range(300)]  # +-25 % around break-even

    def switches(config: PlannerConfig) -> int:
        est = NetworkEstimator(EstimatorConfig(prior_rtt_ms=rtt, prior_bandwidth_mbps=even))
        sim = LinkSimulator(m, est, np.random.default_rng(4), noise=0.3)
        splits = _run(Planner(m, config), sim, links, start=N_LAYERS)
        return sum(a != b for a, b in itertools.pairwise(splits))

    naive = switches(PlannerConfig(margin=0.0, min_gain=0.0, patience=1, noise_factor=0.0))
    damped = switches(PlannerConfig())
    assert naive >= 10, f"the feed is not noisy enough to test anything ({naive} switches without hysteresis)"
    assert damped <= 4, f"{damped} switches in 300 noisy tokens (naive planner: {naive})"


@pytest.mark.parametrize("before_mbps, after_mbps", [(500.0, 2.0), (50.0, 1.0)])
def test_converges_within_a_few_tokens_after_a_bandwidth_drop(before_mbps, after_mbps):
    m = _model(token_only=False)
    rtt = 5.0
    est = NetworkEstimator(EstimatorConfig(prior_rtt_ms=rtt, prior_bandwidth_mbps=before_mbps))
    sim = LinkSimulator(m, est, np.random.default_rng(5), noise=0.1)
    links = [(rtt, before_mbps)] * 30 + [(rtt, after_mbps)] * 30
    splits = _run(Planner(m), sim, links, start=0)
    best_before = best_split(m, NetworkEstimate.fixed(rtt, before_mbps))[0]
    best_after = best_split(m, NetworkEstimate.fixed(rtt, after_mbps))[0]
    assert best_before != best_after
    assert splits[29] == best_before
    settled = next(i for i in range(30, 60) if all(s == best_after for s in splits[i:]))
    assert settled - 30 <= 5, f"took {settled - 30} tokens to settle on split {best_after}: {splits[28:45]}"


def test_converges_after_an_rtt_rise_seen_by_probes():
    m = _model()  # token ids back: RTT decides
    est = NetworkEstimator(EstimatorConfig(prior_rtt_ms=2.0, prior_bandwidth_mbps=100.0))
    sim = LinkSimulator(m, est, np.random.default_rng(6), noise=0.1)
    links = [(2.0, 100.0)] * 20 + [(200.0, 100.0)] * 20
    splits = _run(Planner(m), sim, links, start=0)
    assert splits[19] == 0 and all(s == N_LAYERS for s in splits[25:]), splits


def test_estimator_tracks_rtt_and_bandwidth():
    est = NetworkEstimator(EstimatorConfig(prior_rtt_ms=100.0, prior_bandwidth_mbps=1.0))
    for _ in range(20):
        est.observe_rtt(0.010)
        est.observe(200_000, 100, 0.010 + 200_100 * 8 / 50e6 + 0.004, 0.004)
    e = est.estimate()
    assert e.rtt_ms == pytest.approx(10.0, rel=0.05)
    assert e.bandwidth_mbps == pytest.approx(50.0, rel=0.05)
    assert e.rtt_samples == 20 and e.bandwidth_samples == 20


def test_compute_corrections_rescale_predictions():
    planner = Planner(_model())
    before = split_cost(planner.model, NetworkEstimate.fixed(1, 100), 0).server_ms
    for _ in range(30):
        planner.observe_compute("server", before * planner.model.server_scale, 2 * before)
    after = split_cost(planner.model, NetworkEstimate.fixed(1, 100), 0).server_ms
    assert after == pytest.approx(2 * before, rel=0.02)


def test_estimator_ignores_a_spike_and_follows_a_step_in_two_samples():
    est = NetworkEstimator(EstimatorConfig(prior_rtt_ms=10.0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        est.observe_rtt(float(rng.normal(0.010, 0.0005)))
    est.observe_rtt(0.200)  # one spike (a retransmission, a GC pause): the mean does not move
    assert est.estimate().rtt_ms == pytest.approx(10.0, abs=1.0)
    for _ in range(10):  # the spike widened the deviation; normal samples narrow it again
        est.observe_rtt(float(rng.normal(0.010, 0.0005)))
    for sample in (0.100, 0.101):  # the link changed: two samples on the same side
        est.observe_rtt(sample)
    assert est.estimate().rtt_ms == pytest.approx(101.0, abs=1.0)
