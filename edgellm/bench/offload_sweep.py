"""`python -m edgellm.bench.offload_sweep [--quick]`: offloaded generation over a grid of links.

Per-token decode latency and device energy per token for all-local, all-cloud, the best static split
(oracle: every candidate split measured at every point) and the adaptive planner, over bandwidth x RTT;
a run where the bandwidth drops mid-generation; and a load test (N sessions at once against one server).
Writes bench_results/offload_sweep.{json,md,png}, each atomically. Not a test: never collected by pytest.

Everything is real and on this machine: the server is `edgellm serve-cloud` in its own process; the
device runs the same model on an emulated board `--slowdown` x slower than this host (emulation.py: real
compute, board timing); the link is the shaping proxy (token-bucket rate, one-way delay = RTT / 2 on top
of loopback). Decoding samples with a seed, so the server returns logits (vocab x 4 bytes per token) and
bandwidth matters; every run's tokens are compared with the all-local ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError

log = logging.getLogger(__name__)
TOKEN = "offload-sweep-local-token"
FULL_GRID = {"bandwidths_mbps": (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0), "rtts_ms": (2.0, 10.0, 50.0, 200.0)}
QUICK_GRID = {"bandwidths_mbps": (1.0, 10.0, 100.0, 1000.0), "rtts_ms": (2.0, 50.0, 200.0)}


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep runs; `quick()` is the few-minute version."""

    bandwidths_mbps: tuple[float, ...] = FULL_GRID["bandwidths_mbps"]
    rtts_ms: tuple[float, ...] = FULL_GRID["rtts_ms"]
    model: str | None = None
    prompt_tokens: int = 32
    new_tokens: int = 16
    run_budget_s: float = 12.0  # a run stops after this long (slow links), keeping what it measured
    slowdown: float = 4.0
    server_threads: int = 1
    device_threads: int = 1
    energy_target: str = "rpi5-cortex-a76-ort"
    temperature: float = 0.7
    seed: int = 0
    drop_rtt_ms: float = 20.0
    drop_from_mbps: float = 100.0
    drop_to_mbps: float = 2.0
    drop_tokens: int = 40
    drop_at: int = 10
    load_sessions: int = 32
    load_tokens: int = 64
    max_minutes: float = 40.0
    warmup_tokens: int = 4  # the adaptive generator's unmeasured first generation at each point

    def __post_init__(self) -> None:
        if not self.bandwidths_mbps or not self.rtts_ms or min(self.bandwidths_mbps) <= 0 or min(self.rtts_ms) < 0:
            raise ConfigError("the grid needs bandwidths > 0 Mbit/s and RTTs >= 0 ms")
        if self.new_tokens < 2 or self.drop_at >= self.drop_tokens or self.slowdown < 1:
            raise ConfigError("need new_tokens >= 2, drop_at < drop_tokens, slowdown >= 1")

    @classmethod
    def quick(cls, **overrides: Any) -> SweepConfig:
        base = {**QUICK_GRID, "new_tokens": 8, "run_budget_s": 6.0, "drop_tokens": 20, "drop_at": 6,
                "load_sessions": 8, "load_tokens": 16, "max_minutes": 12.0}
        return cls(**{**base, **overrides})


@dataclass
class Run:
    """One generation as the consumer saw it."""

    tokens: list[int]
    gaps_ms: list[float]  # wall time between consecutive tokens (decode steps)
    ttft_ms: float
    energy_mj_per_token: float
    splits: list[int] = field(default_factory=list)
    moves: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    @property
    def per_token_ms(self) -> float:
        """Decode: mean wall time between tokens (moves and faults included)."""
        return statistics.mean(self.gaps_ms) if self.gaps_ms else float("nan")

    @property
    def end_to_end_ms(self) -> float:
        """(time to first token + decode) / tokens: what the planner minimises, prefill included."""
        return (self.ttft_ms + sum(self.gaps_ms)) / len(self.tokens) if self.tokens else float("nan")


def _consume(events: Iterator[Any], budget_s: float, on_token: Callable[[int], None] | None = None) -> tuple:
    tokens, stamps = [], []
    t0 = time.perf_counter()
    for i, event in enumerate(events):
        stamps.append(time.perf_counter())
        tokens.append(event.token_id)
        if on_token is not None:
            on_token(i)
        if stamps[-1] - t0 > budget_s and len(tokens) >= 3:
            break
    gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:], strict=False)]
    return tokens, gaps, (stamps[0] - t0) * 1e3 if stamps else float("nan")


class Bench:
    """The sweep's fixed parts: model, device, server process, proxy, profiles, and the oracle tokens."""

    def __init__(self, config: SweepConfig) -> None:
        import torch

        from edgellm.model.loader import load_model
        from edgellm.model.tokenizer import Tokenizer
        from edgellm.offload.emulation import EmulatedBackend
        from edgellm.offload.identity import model_sha256
        from edgellm.offload.profile import ActivationSizes, energy_model, measure_layer_profile
        from edgellm.runtime.generation import GenerationConfig
        from edgellm.runtime.registry import create_backend
        from edgellm.runtime.sampling import SamplingConfig

        torch.set_num_threads(config.device_threads)
        self.config = config
        self.model = load_model(config.model)
        self.tokenizer = Tokenizer(self.model.tokenizer)
        self.sha256 = model_sha256(self.model)
        host = create_backend("reference", self.model)
        self.device = EmulatedBackend.slowed(host, config.slowdown, prefill_tokens=16, decode_context=16, repeats=5)
        self.device_profile = measure_layer_profile(self.device, prefill_tokens=16, decode_context=16, repeats=3)
        self.energy = energy_model(config.energy_target)
        self.sizes = ActivationSizes.from_config(self.model.config)
        text = "The history of computing is a story of machines that became smaller and closer to us. " * 8
        self.prompt = self.tokenizer.encode(text)[:config.prompt_tokens]
        self.generation = lambda n: GenerationConfig(
            max_new_tokens=n, stop_at_eos=False,
            sampling=SamplingConfig(temperature=config.temperature, top_k=40, top_p=0.95, seed=config.seed))
        self.n_layers = self.model.config.n_layers

    def local(self, n_tokens: int, budget_s: float) -> Run:
        """All-local: the plain generate loop on the device's whole model (the baseline)."""
        from edgellm.runtime.generation import generate

        session = self.device.open_session(max_tokens=len(self.prompt) + n_tokens)
        tokens, gaps, ttft = _consume(generate(session, self.tokenizer, self.prompt, self.generation(n_tokens)),
                                      budget_s)
        energy = self.energy.power_compute_w * (statistics.mean(gaps) if gaps else 0.0)
        return Run(tokens, gaps, ttft, energy, [self.n_layers] * len(tokens))

    def offloaded(self, url: str, split: int | None, n_tokens: int, budget_s: float,
                  on_token: Callable[[int], None] | None = None, warmup_tokens: int = 0) -> Run:
        """Static split (an int) or adaptive (None) through the same OffloadedGenerator. warmup_tokens: a
        short unmeasured generation first, as a long-lived device would have had (the planner learns the
        server's real speed under load, the estimator the link)."""
        from edgellm.offload.generate import OffloadConfig, OffloadedGenerator

        config = OffloadConfig(static_split=split, timeout_s=30.0, probe_interval_s=0.25)
        with OffloadedGenerator(self.device, [url], TOKEN, model_sha256=self.sha256, config=config,
                                device_profile=self.device_profile, energy=self.energy) as gen:
            if warmup_tokens:
                _consume(gen.generate(self.tokenizer, self.prompt, self.generation(warmup_tokens)), budget_s)
            tokens, gaps, ttft = _consume(gen.generate(self.tokenizer, self.prompt, self.generation(n_tokens)),
                                          budget_s, on_token)
            records = gen.last_records
        decode = [r for r in records if r.position >= len(self.prompt)]
        energy = statistics.mean(r.energy_mj for r in decode) if decode else float("nan")
        faults = [r.fault for r in records if r.fault]
        if split is not None and split < self.n_layers and any(r.split != split for r in records):
            faults.append(f"static split {split} ran elsewhere (server unreachable)")
        return Run(tokens, gaps, ttft, energy, [r.split for r in records], [r.move for r in records if r.move],
                   faults)

    def predicted_ms(self, server_profile, rtt_ms: float, mbps: float) -> dict[int, float]:
        """The planner's model of one decode token at every split, for the true link (validation)."""
        from edgellm.offload.network import NetworkEstimate
        from edgellm.offload.planner import CostModel, split_cost

        model = CostModel(self.device_profile, server_profile, self.sizes, self.energy, token_only=False)
        net = NetworkEstimate.fixed(rtt_ms, mbps)
        return {k: split_cost(model, net, k).latency_ms for k in range(self.n_layers + 1)}


def _candidates(n: int, predicted: dict[int, float]) -> list[int]:
    """Static splits measured at a point: the extremes, one in, the middle, one short, the model's best."""
    best = min(predicted, key=predicted.get)
    return sorted({0, 1, n // 2, n - 1, best} - {n})


def sweep(bench: Bench, url: str, proxy, base_rtt_ms: float, server_profile, deadline: float, progress) -> list:
    """Every grid point: all-cloud and the other static candidates, adaptive; all-local measured once."""
    c = bench.config
    local = bench.local(c.new_tokens, c.run_budget_s)
    progress.update(1)
    points = []
    for rtt in c.rtts_ms:
        for mbps in c.bandwidths_mbps:
            if time.monotonic() > deadline:
                log.warning("time budget spent: the sweep stops before RTT %g ms, %g Mbit/s", rtt, mbps)
                return points
            proxy.set(rate_mbps=mbps, delay_ms=max(0.0, rtt - base_rtt_ms) / 2)
            predicted = bench.predicted_ms(server_profile, max(rtt, base_rtt_ms), mbps)
            static = {}
            for k in _candidates(bench.n_layers, predicted):
                static[k] = bench.offloaded(url, k, c.new_tokens, c.run_budget_s)
                progress.update(1)
            static[bench.n_layers] = local
            adaptive = bench.offloaded(url, None, c.new_tokens, c.run_budget_s, warmup_tokens=c.warmup_tokens)
            progress.update(1)
            points.append(_point(bench, rtt, mbps, local, static, adaptive, predicted))
    return points


def _point(bench: Bench, rtt: float, mbps: float, local: Run, static: dict[int, Run], adaptive: Run,
           predicted: dict[int, float]) -> dict:
    best = min(static, key=lambda k: static[k].per_token_ms)
    best_e2e = min(static, key=lambda k: static[k].end_to_end_ms)
    want = local.tokens

    def same(run: Run) -> bool:
        m = min(len(run.tokens), len(want))
        return run.tokens[:m] == want[:m]

    return {
        "rtt_ms": rtt, "bandwidth_mbps": mbps,
        "local_ms": local.per_token_ms, "cloud_ms": static[0].per_token_ms,
        "best_static_split": best, "best_static_ms": static[best].per_token_ms,
        "adaptive_ms": adaptive.per_token_ms,
        "adaptive_over_best": adaptive.per_token_ms / static[best].per_token_ms,
        "adaptive_splits": _histogram(adaptive.splits[1:]), "adaptive_prefill_split": adaptive.splits[0],
        "adaptive_moves": adaptive.moves,
        "static_ms": {k: r.per_token_ms for k, r in static.items()},
        "end_to_end_ms": {"best_static_split": best_e2e, "best_static": static[best_e2e].end_to_end_ms,
                          "adaptive": adaptive.end_to_end_ms, "local": local.end_to_end_ms,
                          "adaptive_over_best": adaptive.end_to_end_ms / static[best_e2e].end_to_end_ms,
                          "static": {k: r.end_to_end_ms for k, r in static.items()}},
        "predicted_ms": {k: predicted[k] for k in static},
        "model_best_split": min(predicted, key=predicted.get),
        "energy_mj_per_token": {"local": local.energy_mj_per_token, "cloud": static[0].energy_mj_per_token,
                                "best_static": static[best].energy_mj_per_token,
                                "adaptive": adaptive.energy_mj_per_token},
        "tokens_measured": {k: len(r.tokens) for k, r in static.items()} | {"adaptive": len(adaptive.tokens)},
        "identical_tokens": all(same(r) for r in [*static.values(), adaptive]),
        "faults": sum(len(r.faults) for r in [*static.values(), adaptive]),  # a fault voids the point's timings
    }


def _histogram(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def drop_run(bench: Bench, url: str, proxy, base_rtt_ms: float, server_profile, progress) -> dict:
    """Bandwidth drops at token `drop_at`: adaptive vs staying in the cloud vs all-local, token by token."""
    c = bench.config
    n = bench.n_layers
    budget = 10 * c.run_budget_s
    delay = max(0.0, c.drop_rtt_ms - base_rtt_ms) / 2

    def run(split: int | None) -> Run:
        proxy.set(rate_mbps=c.drop_from_mbps, delay_ms=delay)

        def drop(i: int) -> None:
            if i == c.drop_at:
                proxy.set(rate_mbps=c.drop_to_mbps)

        out = bench.offloaded(url, split, c.drop_tokens, budget, on_token=drop,
                              warmup_tokens=c.warmup_tokens if split is None else 0) if split != n else \
            bench.local(c.drop_tokens, budget)
        progress.update(1)
        return out

    adaptive, cloud, local = run(None), run(0), run(n)
    before = bench.predicted_ms(server_profile, c.drop_rtt_ms, c.drop_from_mbps)
    after = bench.predicted_ms(server_profile, c.drop_rtt_ms, c.drop_to_mbps)
    best_after = min(after, key=after.get)
    decode_splits = adaptive.splits[1:]  # split used for the token after each event
    settled = next((i for i in range(c.drop_at, len(decode_splits))
                    if all(s == best_after for s in decode_splits[i:])), None)
    return {
        "rtt_ms": c.drop_rtt_ms, "from_mbps": c.drop_from_mbps, "to_mbps": c.drop_to_mbps, "drop_at_token": c.drop_at,
        "model_best_before": min(before, key=before.get), "model_best_after": best_after,
        "tokens_to_converge": None if settled is None else settled - c.drop_at,
        "adaptive": {"gaps_ms": adaptive.gaps_ms, "splits": adaptive.splits, "moves": adaptive.moves},
        "cloud": {"gaps_ms": cloud.gaps_ms}, "local": {"gaps_ms": local.gaps_ms},
        "identical_tokens": all(r.tokens[:min(len(r.tokens), len(local.tokens))] ==
                                local.tokens[:min(len(r.tokens), len(local.tokens))] for r in (adaptive, cloud)),
        "faults": len(adaptive.faults) + len(cloud.faults),
    }


def _base_rtt_ms(url: str) -> float:
    from edgellm.offload.client import CloudClient
    from edgellm.offload.generate import with_nodelay

    with with_nodelay(CloudClient(url, TOKEN)) as client:
        samples = []
        for _ in range(12):
            t0 = time.perf_counter()
            client.health()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples[2:])


def run_sweep(config: SweepConfig, out: Path) -> dict:
    from tqdm import tqdm

    from edgellm.bench.offload_load import ServerProcess, load_test
    from edgellm.bench.speed import machine_tag
    from edgellm.offload.client import CloudClient
    from edgellm.offload.profile import server_profile
    from edgellm.offload.shaping_proxy import ProxyLimits, ShapingProxy

    t_start = time.monotonic()
    deadline = t_start + 60 * config.max_minutes
    bench = Bench(config)
    points_total = len(config.rtts_ms) * len(config.bandwidths_mbps)
    result: dict[str, Any] = {"config": asdict(config), "machine": machine_tag(),
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False}
    with ServerProcess(config.model, TOKEN, threads=config.server_threads) as server:
        with CloudClient(server.url, TOKEN) as client:
            profile = server_profile(client.capabilities())
        if getattr(bench.model.config, "uniform", True):
            profile = profile.layer_median()  # as the generator plans with it
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        limits = ProxyLimits(lifetime_s=60 * config.max_minutes + 3600)  # outlive the whole sweep
        with ShapingProxy(host, int(port), limits=limits) as proxy, tqdm(total=1 + 5 * points_total + 3, desc="offload sweep",
                                                          unit="run") as progress:
            base = _base_rtt_ms(proxy.url)
            result.update(base_rtt_ms=base, device_profile=asdict(bench.device_profile),
                          server_profile=asdict(profile), board=asdict(bench.device.board))
            result["points"] = sweep(bench, proxy.url, proxy, base, profile, deadline, progress)
            result["drop"] = drop_run(bench, proxy.url, proxy, base, profile, progress)
        load = load_test(server, bench.prompt[:16], config.load_sessions, config.load_tokens, bench.sha256)
        result["load"] = asdict(load)
    result["duration_s"] = time.monotonic() - t_start
    result["complete"] = len(result["points"]) == points_total
    result["summary"] = summarize(result)
    write_results(result, out)
    return result


def summarize(result: dict) -> dict:
    points = result["points"]
    worst = max(points, key=lambda p: p["adaptive_over_best"]) if points else None
    return {
        "points": len(points),
        "adaptive_within_10pct": sum(p["adaptive_over_best"] <= 1.10 for p in points),
        "adaptive_within_10pct_end_to_end": sum(p["end_to_end_ms"]["adaptive_over_best"] <= 1.10 for p in points),
        "worst_adaptive_over_best": worst and worst["adaptive_over_best"],
        "worst_point": worst and {"rtt_ms": worst["rtt_ms"], "bandwidth_mbps": worst["bandwidth_mbps"]},
        "model_picked_measured_best": sum(p["model_best_split"] == p["best_static_split"] for p in points),
        "all_identical": all(p["identical_tokens"] for p in points) and result["drop"]["identical_tokens"],
        "faults": sum(p["faults"] for p in points) + result["drop"]["faults"],
        "drop_tokens_to_converge": result["drop"]["tokens_to_converge"],
        "load_errors": result["load"]["errors"],
    }


def format_markdown(result: dict) -> str:
    c, s = result["config"], result["summary"]
    lines = [
        "# Offload sweep", "",
        (f"{result['time']}, commit {result['machine'].get('commit')}, {result['machine'].get('cpu')}, "
        f"load average {result['machine'].get('load_average_1m'):.1f}; model {c['model'] or 'default'}; device "
        f"board = this host x {c['slowdown']:g}; server 1 process, {c['server_threads']} thread(s); "
        f"sampled decoding (logits on the wire); {c['new_tokens']} new tokens per run (cut at "
        f"{c['run_budget_s']:g} s); loopback RTT {result['base_rtt_ms']:.2f} ms. Duration {result['duration_s']:.0f} s."),
        "",
        (f"Adaptive within 10 % of the best static split at {s['adaptive_within_10pct']}/{s['points']} points "
        f"(worst {s['worst_adaptive_over_best']:.2f}x at {s['worst_point']}) in decode ms/token, at "
        f"{s['adaptive_within_10pct_end_to_end']}/{s['points']} end to end (prefill + decode per token, what the "
        f"planner minimises); the cost model picked the measured "
        f"best split at {s['model_picked_measured_best']}/{s['points']}; tokens identical to all-local: "
        f"{s['all_identical']}; after the drop the adaptive run settled in {s['drop_tokens_to_converge']} tokens; "
        f"faults (server lost, timings void): {s['faults']}."),
        "",
        ("| RTT ms | Mbit/s | local ms/tok | cloud ms/tok | best static (K) | adaptive ms/tok | adaptive/best | "
        "adaptive splits | energy mJ/tok local / best / adaptive |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        e = p["energy_mj_per_token"]
        lines.append(
            f"| {p['rtt_ms']:g} | {p['bandwidth_mbps']:g} | {p['local_ms']:.0f} | {p['cloud_ms']:.0f} | "
            f"{p['best_static_ms']:.0f} ({p['best_static_split']}) | {p['adaptive_ms']:.0f} | "
            f"{p['adaptive_over_best']:.2f} | {p['end_to_end_ms']['adaptive_over_best']:.2f} | "
            f"{p['adaptive_prefill_split']}, then {p['adaptive_splits']} | {e['local']:.0f} / {e['best_static']:.0f} / "
            f"{e['adaptive']:.0f} |")
    d, ld = result["drop"], result["load"]
    lines += ["", (f"Bandwidth drop {d['from_mbps']:g} -> {d['to_mbps']:g} Mbit/s at token {d['drop_at_token']} "
              f"(RTT {d['rtt_ms']:g} ms): model best split {d['model_best_before']} -> {d['model_best_after']}; "
              f"adaptive settled after {d['tokens_to_converge']} tokens; moves {d['adaptive']['moves']}."),
              "", (f"Load: {ld['sessions']} sessions x {ld['tokens_per_session']} tokens, all-cloud, greedy ids back: "
              f"{ld['errors']} errors, per-token p50 {ld['p50_ms']:.0f} ms, p99 {ld['p99_ms']:.0f} ms, "
              f"{ld['tokens_per_s']:.1f} tokens/s, server RSS {ld['rss_before_mb']:.0f} -> peak {ld['rss_peak_mb']:.0f} "
              f"MB (after {ld['rss_after_mb']:.0f} MB).")]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rtts = sorted({p["rtt_ms"] for p in result["points"]})
    fig, axes = plt.subplots(1, len(rtts) + 1, figsize=(4.2 * (len(rtts) + 1), 3.8))
    for ax, rtt in zip(axes, rtts, strict=False):
        pts = sorted((p for p in result["points"] if p["rtt_ms"] == rtt), key=lambda p: p["bandwidth_mbps"])
        x = [p["bandwidth_mbps"] for p in pts]
        for key, label, style in (("local_ms", "all-local", "k--"), ("cloud_ms", "all-cloud", "b-"),
                                  ("best_static_ms", "best static", "g-"), ("adaptive_ms", "adaptive", "r.-")):
            ax.plot(x, [p[key] for p in pts], style, label=label)
        ax.set(xscale="log", yscale="log", title=f"RTT {rtt:g} ms", xlabel="bandwidth Mbit/s", ylabel="ms per token")
    axes[0].legend(fontsize=8)
    d, ax = result["drop"], axes[-1]
    for key, style in (("adaptive", "r.-"), ("cloud", "b-"), ("local", "k--")):
        ax.plot(range(1, len(d[key]["gaps_ms"]) + 1), d[key]["gaps_ms"], style, label=key)
    ax.axvline(d["drop_at_token"] + 0.5, color="grey", lw=0.8)
    ax.set(yscale="log", title=f"{d['from_mbps']:g} -> {d['to_mbps']:g} Mbit/s", xlabel="token",
           ylabel="ms per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)


def _atomic(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(result: dict, out: Path) -> None:
    """out.json, out.md, out.png (each replaced atomically)."""
    _atomic(out.with_suffix(".json"), lambda f: json.dump(result, f, indent=1, default=_jsonable))
    _atomic(out.with_suffix(".md"), lambda f: f.write(format_markdown(result)))
    plot(result, out.with_suffix(".png"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgellm.bench.offload_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few-minute sweep (fewer points and tokens)")
    p.add_argument("--model", default=None, help="model (default: the default model)")
    p.add_argument("--out", default="bench_results/offload_sweep", help="output path without suffix")
    p.add_argument("--slowdown", type=float, default=None, help="device board = this host x this (default 4)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop the grid after this long")
    p.add_argument("--load-sessions", type=int, default=None)
    p.add_argument("--load-tokens", type=int, default=None)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in {"model": args.model, "slowdown": args.slowdown, "max_minutes": args.max_minutes,
                                   "load_sessions": args.load_sessions, "load_tokens": args.load_tokens}.items()
                 if v is not None}
    config = SweepConfig.quick(**overrides) if args.quick else SweepConfig(**overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_sweep(config, Path(args.out))
    print(format_markdown(result))
    return 0 if result["summary"]["all_identical"] and result["summary"]["load_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
