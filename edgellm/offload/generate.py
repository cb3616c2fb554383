"""Adaptive offloaded generation: the device runs [0, K), a cloud server [K, n) + head, K re-planned live.

`OffloadedGenerator.generate()` runs edgellm.runtime.generation.generate() on a SplitSession, a Session
over the whole model whose forward() is where offloading happens, so sampling, stop strings and text
streaming are the local ones and the TokenEvent stream is the same:

    forward(ids) ─► re-plan (planner + live estimate) ─► move KV of layers that change sides
                 ─► device [0, K) ─► hidden ─► server [K, n) + head ─► logits (or the argmax id, greedy)
                           └────── on CloudError: roll the device back to the chunk start, rebuild
                                   [K, n) here by exact replay, run the chunk locally ──┘

A fault never loses or repeats a token: the token being computed is recomputed locally from the same
inputs, and the failed server is left until its health probe answers again (then the planner may move
back to it, or to the next URL, paying the replay it takes). Greedy output is bit-identical to
all-local: float32 hidden states, KV moved as float32, recompute only by replaying the original chunks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edgellm.compress.target import EnergyModel
from edgellm.errors import CloudError, ConfigError
from edgellm.model.tokenizer import Tokenizer
from edgellm.offload.device import DeviceStack, ReplayLog
from edgellm.offload.network import EstimatorConfig, NetworkEstimate, NetworkEstimator, Prober
from edgellm.offload.planner import (
    CostModel,
    Decision,
    MoveCost,
    Planner,
    PlannerConfig,
    move_cost,
    split_cost,
)
from edgellm.offload.profile import ActivationSizes, LayerProfile, load_or_measure, server_profile
from edgellm.runtime.backend import Backend, LayerRange, Session
from edgellm.runtime.generation import GenerationConfig, TokenEvent
from edgellm.runtime.generation import generate as local_generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OffloadConfig:
    """How the device offloads: planning, estimation, timeouts, and a forced split for comparisons."""

    planner: PlannerConfig = field(default_factory=PlannerConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    static_split: int | None = None  # --offload-split K: no re-planning (a fault still falls back locally)
    timeout_s: float = 10.0  # a request with no answer for this long is a fault
    probe_interval_s: float = 0.5
    sized_probe_every: int = 4  # every Nth probe also fetches capabilities: a bandwidth sample while local
    warmup_probes: int = 3  # probe pairs (health + 19 KB) before the first plan: it starts from a measurement
    retry_after_s: float = 2.0  # a failed server is not used again before this (and before it answers)
    dtype: str = "float32"  # hidden states on the wire; float32 keeps greedy output bit-identical

    def __post_init__(self) -> None:
        if self.static_split is not None and self.static_split < 0:
            raise ConfigError(f"offload split must be >= 0, found {self.static_split}")
        if not (self.timeout_s > 0 and self.probe_interval_s > 0 and self.retry_after_s >= 0):
            raise ConfigError("timeout_s and probe_interval_s must be > 0, retry_after_s >= 0")
        if self.sized_probe_every < 1:
            raise ConfigError(f"sized_probe_every must be >= 1, found {self.sized_probe_every}")


@dataclass(frozen=True)
class StepRecord:
    """One forward() of a generation: where it ran, what it cost, what happened."""

    position: int
    n_tokens: int
    split: int
    endpoint: str | None
    latency_ms: float  # wall time of the whole step, moves and fault recovery included
    device_ms: float
    remote_ms: float
    server_ms: float
    bytes_sent: int
    bytes_received: int
    energy_mj: float  # device energy by the target's power model (measured times, estimated transfer share)
    move: str | None = None
    fault: str | None = None


class Endpoint:
    """One server URL: its client, its own network estimate and prober, its profile, and its health."""

    def __init__(self, url: str, token: str | None, config: OffloadConfig, fallback_profile: LayerProfile,
                 uniform_layers: bool = False) -> None:
        from edgellm.offload.client import CloudClient

        self.url, self.fallback_profile, self.uniform_layers = url, fallback_profile, uniform_layers
        self.client = with_nodelay(CloudClient(url, token, timeout_s=config.timeout_s, dtype=config.dtype))
        self._probe_client = with_nodelay(CloudClient(url, token, timeout_s=min(config.timeout_s, 2.0), dtype=config.dtype))
        self.estimator = NetworkEstimator(config.estimator)
        self.config = config
        self.profile: LayerProfile | None = None
        self.down_until = 0.0
        self.failed_at: float | None = None
        self.in_flight = 0  # generation requests under way (the prober waits for the link to be idle)
        self.prober = Prober(self._probe_client.health, self.estimator, config.probe_interval_s,
                             sized=self._sized_probe, sized_every=config.sized_probe_every,
                             busy=lambda: self.in_flight > 0)

    def connect(self) -> bool:
        """Read capabilities (the server's profile); False when the server cannot be reached."""
        try:  # not network samples: first requests also pay the TCP connect and the server's warm-up
            caps = self.client.capabilities(refresh=True)
            self._probe_client.request("GET", "/openapi.json")  # FastAPI builds it on first use (~40 ms)
        except CloudError as exc:
            log.warning("offload server %s unavailable: %s", self.url, exc)
            self.mark_down()
            return False
        if caps.get("profile"):
            self.profile = server_profile(caps)
            if self.uniform_layers:  # one short start-up run per layer: smooth what must be equal
                self.profile = self.profile.layer_median()
        else:
            log.warning("%s publishes no per-layer profile; planning as if it were as fast as this device", self.url)
            self.profile = self.fallback_profile
        return True

    def _sized_probe(self, rtt_ms: float) -> None:
        """The OpenAPI document (~19 KB, public, cached by the server) right after a health probe: a
        bandwidth sample while all-local, resolvable up to ~100 Mbit/s."""
        self._probe_client.request("GET", "/openapi.json")
        t = self._probe_client.last_timing
        if t is not None:
            self.estimator.observe(t.bytes_sent, t.bytes_received, t.wall_s, t.server_s or 0.0, rtt_ms=rtt_ms,
                                   probe=True)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark generation traffic in flight (only the generation thread changes the count)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def _feed(self, timing) -> None:
        if timing is not None:
            self.estimator.observe(timing.bytes_sent, timing.bytes_received, timing.wall_s, timing.server_s or 0.0)

    @property
    def available(self) -> bool:
        """Known, not inside its back-off, and (after a failure) answered a probe sent since then."""
        if self.profile is None and not self.connect_quietly():
            return False
        now = time.monotonic()
        recovered = self.failed_at is None or self.prober.last_ok_sent > self.failed_at
        return now >= self.down_until and recovered

    def connect_quietly(self) -> bool:
        """A server that was down at start-up: connect once it answers probes again."""
        if self.failed_at is None or self.prober.last_ok_sent <= self.failed_at:
            return False
        return self.connect()

    def mark_down(self) -> None:
        now = time.monotonic()
        self.down_until, self.failed_at = now + self.config.retry_after_s, now

    def close(self) -> None:
        self.prober.stop()
        self.client.close()
        self._probe_client.close()


def with_nodelay(client):
    """Turn Nagle off on the client's connections.

    Without TCP_NODELAY a request whose headers and body leave in two writes waits for the server's
    delayed ACK: ~40 ms per forward on Linux loopback (measured: 36 ms -> 5 ms per tiny-model step).
    CloudClient does not set it (yet), so its httpx client is rebuilt here with the same settings.
    """
    import socket

    import httpx

    http = getattr(client, "_http", None)
    if isinstance(http, httpx.Client):
        client._http = httpx.Client(
            base_url=http.base_url, headers=http.headers, timeout=http.timeout,
            transport=httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                          limits=httpx.Limits(max_connections=8, max_keepalive_connections=4,
                                                              keepalive_expiry=60.0)))
        http.close()
    return client


class OffloadedGenerator:
    """Generation with the model split between this device's backend and one or more cloud servers."""

    def __init__(self, backend: Backend, urls: Sequence[str], token: str | None = None, *,
                 model_sha256: str | None = None, config: OffloadConfig = OffloadConfig(),
                 device_profile: LayerProfile | None = None, energy: EnergyModel | None = None,
                 profile_label: str = "") -> None:
        if not urls:
            raise ConfigError("offloading needs at least one server URL")
        n = backend.config.n_layers
        if config.static_split is not None and config.static_split > n:
            raise ConfigError(f"offload split {config.static_split} is outside 0..{n} (the model has {n} layers)")
        self.backend, self.config, self.model_sha256 = backend, config, model_sha256
        self.device_profile = device_profile or load_or_measure(backend, backend.config.name or "model",
                                                                profile_label)
        self.energy = energy
        self.sizes = ActivationSizes.from_config(backend.config)
        uniform = bool(getattr(backend.config, "uniform", True))  # False for structurally pruned models
        self.endpoints = [Endpoint(u, token, config, self.device_profile, uniform) for u in urls]
        self._planners: dict[str, Planner] = {}
        self._started = False
        self.last_records: list[StepRecord] = []

    def _start(self) -> None:
        if self._started:
            return
        for ep in self.endpoints:
            if ep.connect():
                if ep.profile.n_layers != self.backend.config.n_layers:
                    raise ConfigError(f"{ep.url} serves a model with {ep.profile.n_layers} layers, the device's "
                                      f"has {self.backend.config.n_layers}")
                for _ in range(self.config.warmup_probes):  # a measured link before the first plan
                    ep.prober.probe_once(sized=True)
            ep.prober.start()
        self._started = True

    def planner(self, ep: Endpoint) -> Planner:
        if ep.url not in self._planners:
            model = CostModel(self.device_profile, ep.profile, self.sizes, self.energy)
            self._planners[ep.url] = Planner(model, self.config.planner)
        return self._planners[ep.url]

    def active_endpoint(self) -> Endpoint | None:
        """The first server (in the order given) that is up; None: only local is possible now."""
        self._start()
        return next((ep for ep in self.endpoints if ep.available), None)

    def generate(self, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 config: GenerationConfig | None = None) -> Iterator[TokenEvent]:
        """The same TokenEvent stream as edgellm.runtime.generation.generate on an all-local session."""
        config = config or GenerationConfig()
        if config.lookup is not None:  # the planner times and splits one token per pass
            raise ConfigError("prompt-lookup drafting (GenerationConfig.lookup) does not combine with offloading")
        self._start()
        for ep in self.endpoints:  # an estimate nobody refreshed lately (probes paused, link idle) is re-measured
            if ep.profile is not None and ep.estimator.stale:
                for _ in range(self.config.warmup_probes):
                    ep.prober.probe_once(sized=True)
        ctx = self.backend.config.context_length
        sampling = config.sampling
        session = SplitSession(self, max_tokens=min(ctx, len(prompt_ids) + max(1, config.max_new_tokens)),
                               token_only=sampling.is_greedy and sampling.repetition_penalty == 1.0,
                               prompt_tokens=len(prompt_ids), max_new_tokens=config.max_new_tokens)
        try:
            yield from local_generate(session, tokenizer, prompt_ids, config)
        finally:
            self.last_records = session.records
            session.close()

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()

    def __enter__(self) -> OffloadedGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SplitSession(Session):
    """The whole model (tokens in, logits out) as device [0, K) + remote [K, n); K moves between calls.

    token_only: the server answers the argmax id instead of logits (greedy without penalties); forward()
    then returns one-hot logits (0 at that id, -inf elsewhere), which is all a greedy sampler reads.
    """

    def __init__(self, gen: OffloadedGenerator, max_tokens: int, token_only: bool, prompt_tokens: int,
                 max_new_tokens: int) -> None:
        n = gen.backend.config.n_layers
        super().__init__(LayerRange.full(n), max_tokens)
        self.vocab_size = gen.backend.config.vocab_size
        self.gen, self.n_layers, self.token_only = gen, n, token_only
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.device = DeviceStack(gen.backend, max_tokens)
        self.remote = None  # RemoteSession for [split, n) while split < n
        self.endpoint: Endpoint | None = None
        self.log = ReplayLog()
        self.records: list[StepRecord] = []
        self._pending: int | None = None  # the decode split the prefill plan chose
        self._step_move: str | None = None
        self._step_fault: str | None = None

    @property
    def split(self) -> int:
        return self.device.split

    # -- one forward() ------------------------------------------------------------------------------------
    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray:
        ids = np.asarray(inputs, dtype=np.int64)
        t0 = time.perf_counter()
        self._step_move = self._step_fault = None
        if self.position == 0:
            self._begin(len(ids))
        else:
            self._replan()
        try:
            out, timing = self._run(ids, all_logits)
        except CloudError as exc:
            self._fault(exc)
            out, timing = self._run(ids, all_logits)
        self._record(ids, (time.perf_counter() - t0) * 1e3, timing)
        return out

    def _run(self, ids: np.ndarray, all_logits: bool) -> tuple[np.ndarray, dict]:
        """Device part, then the server's; on a cloud error the device is rolled back to the chunk start."""
        p, k = self.position, self.split
        t0 = time.perf_counter()
        h = self.device.forward(ids, all_logits)
        device_ms = (time.perf_counter() - t0) * 1e3
        timing = {"device_ms": device_ms, "remote_ms": 0.0, "server_ms": 0.0, "sent": 0, "received": 0}
        if k == self.n_layers:
            self.log.append(ids, k, None)
            self._correct(len(ids), device_ms, 0.0)
            return h, timing
        try:
            with self.endpoint.busy():
                if self.token_only and not all_logits:
                    out = np.full((1, self.vocab_size), -np.inf, dtype=np.float32)
                    out[0, self.remote.next_token(h)] = 0.0
                else:
                    out = self.remote.forward(h, all_logits=all_logits)
        except CloudError:
            self.device.truncate(p)
            raise
        t = self.remote.last_timing
        self.endpoint._feed(t)
        timing.update(remote_ms=t.wall_s * 1e3, server_ms=(t.server_s or 0.0) * 1e3, sent=t.bytes_sent,
                      received=t.bytes_received)
        self._correct(len(ids), device_ms, timing["server_ms"])
        self.log.append(ids, k, h if k > 0 else None)
        return out, timing

    def _correct(self, n_tokens: int, device_ms: float, server_ms: float) -> None:
        """Fold decode-step compute times into the planner's per-side corrections."""
        ep = self.endpoint or self.gen.active_endpoint()
        if n_tokens != 1 or ep is None:
            return
        planner = self.gen.planner(ep)
        predicted = split_cost(planner.model, NetworkEstimate.fixed(0.0, 1.0), self.split)
        if self.split > 0:
            planner.observe_compute("device", predicted.device_ms, device_ms)
        if server_ms > 0:
            planner.observe_compute("server", predicted.server_ms, server_ms)

    # -- planning -----------------------------------------------------------------------------------------
    def _begin(self, prompt_tokens: int) -> None:
        """Plan the prefill (and the decode split after it) and open the server session it needs."""
        n, static = self.n_layers, self.gen.config.static_split
        ep = self.gen.active_endpoint()
        if ep is None:
            kp = kd = n
        elif static is not None:
            kp = kd = static
        else:
            planner = self._planner(ep)
            net = ep.estimator.estimate()
            plan = planner.plan(net, prompt_tokens, self.max_new_tokens)
            kp, kd = plan.prefill_split, plan.decode_split
            log.debug("plan %s with %s", plan, net)
        self.device.reset(kp)
        if kp < n:
            try:
                self._open(ep, kp)
            except CloudError as exc:
                self._fault(exc)
        self._pending = kd if kd != self.split else None

    def _planner(self, ep: Endpoint) -> Planner:
        planner = self.gen.planner(ep)
        if planner.model.token_only != self.token_only:
            planner.model = replace(planner.model, token_only=self.token_only)
        return planner

    def _open(self, ep: Endpoint, start: int) -> None:
        self.remote = ep.client.open_session(start, self.max_tokens, model_sha256=self.gen.model_sha256)
        self.endpoint = ep
        ep._feed(ep.client.last_timing)

    def _replan(self) -> None:
        """Before a decode token: choose the split for it, and move there."""
        n, static = self.n_layers, self.gen.config.static_split
        ep = self.endpoint if self.remote is not None else self.gen.active_endpoint()
        target, decision = self.split, None
        if self._pending is not None:
            target, self._pending = self._pending, None
        elif static is not None:
            target = static if ep is not None else n
        elif ep is not None or self.split < n:
            generated = self.position - self.prompt_tokens
            decision = self._planner(ep).step(ep.estimator.estimate(), self.split, self.log.history(),
                                              self.max_new_tokens - generated, cloud=ep is not None,
                                              device_replay_from=self._replay_from(self.split))
            target = decision.split
            log.debug("position %d split %d: %s (%s)", self.position, self.split, decision.reason,
                      {c.split: round(c.latency_ms, 1) for c in decision.costs if c.split in (0, self.split, n)})
        if ep is None:
            target = n
        if target != self.split:
            try:
                with ep.busy() if ep is not None else contextlib.nullcontext():
                    self._move(target, ep, decision)
            except CloudError as exc:
                self._fault(exc)

    def _replay_from(self, start: int) -> int:
        return start if start > 0 and self.log.hidden_at(start) is not None else 0

    # -- moving the split ---------------------------------------------------------------------------------
    def _move(self, new: int, ep: Endpoint | None, decision: Decision | None) -> None:
        old, p = self.split, self.position
        if ep is None:
            raise ConfigError("internal: a move to a cloud split without a server")
        move = decision.move if decision is not None and decision.move.method != "none" else \
            self._move_cost(ep, old, new)
        log.info("split %d -> %d at position %d by %s", old, new, p, move.method)
        if new > old:  # layers [old, new) come to the device
            kv = self.remote.download_kv(old, new) if move.method == "download" else None
            if new < self.n_layers:
                self.remote.move_split(new, p)
            else:
                self._drop_remote()
            self.device.recut(new, kv, self.log)
        elif old < self.n_layers:  # layers [new, old) join the live server session
            kv = self.device.export_kv(new, old)
            self.remote.move_split(new, p, kv=kv)
            self.device.recut(new)
        else:  # from all-local: a new session at layer 0, replayed chunk by chunk, then cut at `new`
            self._open(ep, 0)
            for chunk in self.log.chunks:
                self.remote.next_token(chunk)
            if new > 0:
                self.remote.move_split(new, p)
            self.device.recut(new)
        self._step_move = f"{old}->{new} {move.method}"

    def _move_cost(self, ep: Endpoint, old: int, new: int) -> MoveCost:
        planner = self._planner(ep)
        return move_cost(planner.model, ep.estimator.estimate(), old, new, self.log.history(),
                         planner.config.exact, self._replay_from(old), planner.config.objective)

    def _drop_remote(self, delete: bool = True) -> None:
        """Forget the server session; its DELETE goes in the background (nothing waits for it)."""
        if self.remote is not None and delete:
            threading.Thread(target=self.remote.close, name="edgellm-offload-close", daemon=True).start()
        self.remote, self.endpoint = None, None

    # -- faults ---------------------------------------------------------------------------------------------
    def _fault(self, exc: CloudError) -> None:
        """The server failed: forget it for a while and hold every layer here, rebuilt by exact replay."""
        ep = self.endpoint
        log.warning("offload server %s failed at position %d (split %d): %s; continuing locally",
                    ep.url if ep else "?", self.position, self.split, exc)
        if ep is not None:
            ep.mark_down()
        self._drop_remote(delete=False)  # a stalled server would hold a DELETE too; it expires sessions
        self._pending = None
        old = self.split
        if old < self.n_layers:
            self.device.recut(self.n_layers, None, self.log)
        self._step_fault = f"{type(exc).__name__} at split {old}"

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _record(self, ids: np.ndarray, latency_ms: float, t: dict) -> None:
        ep = self.endpoint
        energy = self.gen.energy
        device_ms, remote_ms = t["device_ms"], t["remote_ms"]
        if energy is None:
            energy_mj = 0.0
        else:
            est = ep.estimator.estimate() if ep is not None else None
            transfer = min(max(0.0, remote_ms - t["server_ms"]),
                           est.transfer_ms(t["sent"] + t["received"]) if est else 0.0)
            other = max(0.0, latency_ms - device_ms - transfer)
            energy_mj = (energy.power_compute_w * device_ms + energy.power_transmit_w * transfer
                         + energy.power_idle_w * other)
        self.records.append(StepRecord(
            position=self.position, n_tokens=len(ids), split=self.split, endpoint=ep.url if ep else None,
            latency_ms=latency_ms, device_ms=device_ms, remote_ms=remote_ms, server_ms=t["server_ms"],
            bytes_sent=t["sent"], bytes_received=t["received"], energy_mj=energy_mj, move=self._step_move,
            fault=self._step_fault))

    def _truncate(self, n_tokens: int) -> None:
        raise ConfigError("an offloaded session cannot roll back; start a new generation")

    def close(self) -> None:
        self._drop_remote()
