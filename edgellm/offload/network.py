"""Live estimate of the link to the cloud: round-trip time and bandwidth, from real request timings.

Every request the device makes reports (bytes sent, bytes received, wall seconds, server seconds) (the
client's `last_timing`); the server's own compute time comes back in a header, so what is left is the
network: `net_ms = rtt_ms + bytes * ms_per_byte`. Small requests (health probes, token ids) are RTT
samples; larger ones (hidden states, logits, KV) are bandwidth samples once the current RTT is taken
off. Both are smoothed like TCP's SRTT/RTTVAR (an EWMA of the value and of its absolute deviation),
with a weight chosen so that a step change is tracked within a few tokens, not a few hundred.

Bandwidth is smoothed as time per byte, not bytes per second, because the planner's costs are linear
in time per byte: averaging it averages predicted transfer times. A request whose transfer part is lost
in the noise (1000 Mbit/s, a 2 KB hidden state) still predicts its own size well, which is what the
planner asks for.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgellm.errors import CloudError, ConfigError

log = logging.getLogger(__name__)

MIN_MS_PER_BYTE = 8e-3 / 100_000.0  # 100 Gbit/s: the fastest link the estimate may claim
MAX_MS_PER_BYTE = 8e-3 / 0.01  # 10 kbit/s: the slowest


def mbps_to_ms_per_byte(mbps: float) -> float:
    """Megabit/s -> milliseconds per byte (8 bits / (mbps * 1e6 bit/s) * 1e3 ms/s)."""
    return 8e-3 / mbps


@dataclass(frozen=True)
class EstimatorConfig:
    """Smoothing and priors of the network estimator.

    alpha: weight of a new sample in the mean (TCP uses 1/8; offload decisions must follow a step change
    within a few tokens, so larger). beta: weight in the mean absolute deviation.
    """

    alpha: float = 0.4
    beta: float = 0.25
    prior_rtt_ms: float = 20.0
    prior_bandwidth_mbps: float = 20.0
    min_bandwidth_bytes: int = 1024  # requests smaller than this are RTT samples
    stale_after_s: float = 5.0  # an estimate with no sample for this long is reported stale

    def __post_init__(self) -> None:
        for key in ("alpha", "beta"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"estimator {key} must be in (0, 1], found {getattr(self, key)}")
        if self.prior_rtt_ms < 0 or self.prior_bandwidth_mbps <= 0:
            raise ConfigError("estimator priors must be rtt >= 0 ms and bandwidth > 0 Mbit/s, found "
                              f"{self.prior_rtt_ms} ms, {self.prior_bandwidth_mbps} Mbit/s")
        if self.min_bandwidth_bytes < 1 or self.stale_after_s <= 0:
            raise ConfigError("min_bandwidth_bytes must be >= 1 and stale_after_s > 0")


@dataclass(frozen=True)
class NetworkEstimate:
    """A snapshot the planner prices a split with (means and mean absolute deviations)."""

    rtt_ms: float
    rtt_dev_ms: float
    ms_per_byte: float
    ms_per_byte_dev: float
    rtt_samples: int = 0
    bandwidth_samples: int = 0
    age_s: float = 0.0
    alpha: float = 1.0  # the smoothing weight behind the means (1: a single sample / exact)

    @property
    def mean_uncertainty(self) -> float:
        """Deviation of an EWMA mean relative to one sample's: sqrt(alpha / (2 - alpha))."""
        return (self.alpha / (2 - self.alpha)) ** 0.5

    @property
    def bandwidth_mbps(self) -> float:
        return 8e-3 / self.ms_per_byte

    def transfer_ms(self, n_bytes: float) -> float:
        """Predicted time on the wire for n_bytes, not counting the round trip."""
        return n_bytes * self.ms_per_byte

    def request_ms(self, n_bytes: float) -> float:
        """Predicted network time of one request/response carrying n_bytes in all."""
        return self.rtt_ms + self.transfer_ms(n_bytes)

    @classmethod
    def fixed(cls, rtt_ms: float, bandwidth_mbps: float) -> NetworkEstimate:
        """An exact, noise-free estimate (tests, what-if planning)."""
        return cls(rtt_ms, 0.0, mbps_to_ms_per_byte(bandwidth_mbps), 0.0)


class _Ewma:
    """Mean and mean absolute deviation, RFC 6298 style, with a spike filter and a step detector.

    A sample more than `step` deviations off does not move the mean (a one-off spike is ignored); a
    second one in a row on the same side means the link changed: the mean restarts at it, so a step is
    followed in two samples, not in the several an EWMA needs. The deviation always updates, so a link
    that is simply that noisy stops producing "spikes".
    """

    def __init__(self, prior: float, alpha: float, beta: float, step: float = 4.0) -> None:
        self.mean, self.dev, self.alpha, self.beta, self.step, self.n = prior, 0.0, alpha, beta, step, 0
        self._spike: tuple[float, float] | None = None  # (sample, deviation before it)

    def add(self, x: float) -> None:
        self.n += 1
        if self.n == 1:  # the first real sample replaces the prior
            self.mean, self.dev = x, abs(x) / 2
            return
        off = x - self.mean
        spike, self._spike = self._spike, None
        base_dev = spike[1] if spike else self.dev
        if base_dev > 0 and abs(off) > self.step * base_dev:
            if spike is not None and (spike[0] - self.mean) * off > 0:  # twice on the same side: a step
                self.mean, self.dev = x, max(abs(spike[0] - x) / 2, base_dev)
                return
            self._spike = (x, self.dev)
            self.dev = (1 - self.beta) * self.dev + self.beta * abs(off)
            return
        self.dev = (1 - self.beta) * self.dev + self.beta * abs(off)
        self.mean = (1 - self.alpha) * self.mean + self.alpha * x


class NetworkEstimator:
    """Thread-safe: the generator feeds request timings while a prober thread feeds health probes."""

    def __init__(self, config: EstimatorConfig = EstimatorConfig(), clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._rtt = _Ewma(config.prior_rtt_ms, config.alpha, config.beta)
        self._mspb = _Ewma(mbps_to_ms_per_byte(config.prior_bandwidth_mbps), config.alpha, config.beta)
        self._last_sample = clock()
        self._last_traffic = float("-inf")

    def observe(self, bytes_sent: int, bytes_received: int, wall_s: float, server_s: float = 0.0,
                rtt_ms: float | None = None, probe: bool = False) -> None:
        """Feed one finished request (the client's last_timing).

        rtt_ms: a round trip measured just before (a probe pair), used instead of the smoothed RTT to
        take the round trip off a bandwidth sample, so a sudden RTT rise is not read as a bandwidth drop.
        probe: the request was a probe, not generation traffic (see `traffic_age_s`).
        """
        net_ms = max(0.0, (wall_s - server_s) * 1e3)
        n_bytes = bytes_sent + bytes_received
        with self._lock:
            self._last_sample = self._clock()
            if not probe:
                self._last_traffic = self._last_sample
            if n_bytes < self.config.min_bandwidth_bytes:
                self._rtt.add(max(0.0, net_ms - n_bytes * self._mspb.mean))
                return
            per_byte = (net_ms - (self._rtt.mean if rtt_ms is None else rtt_ms)) / n_bytes
            # unclamped below: jitter makes some samples negative, and dropping those would bias the mean
            self._mspb.add(min(MAX_MS_PER_BYTE, max(-MAX_MS_PER_BYTE, per_byte)))

    def observe_rtt(self, rtt_s: float) -> None:
        """Feed one tiny request's round trip (a health probe)."""
        self.observe(0, 0, rtt_s, 0.0, probe=True)

    def traffic_age_s(self) -> float:
        """Seconds since generation traffic (not a probe) last reported a sample."""
        with self._lock:
            return self._clock() - self._last_traffic

    def estimate(self) -> NetworkEstimate:
        with self._lock:
            return NetworkEstimate(
                rtt_ms=self._rtt.mean, rtt_dev_ms=self._rtt.dev, ms_per_byte=max(MIN_MS_PER_BYTE, self._mspb.mean),
                ms_per_byte_dev=self._mspb.dev, rtt_samples=self._rtt.n, bandwidth_samples=self._mspb.n,
                age_s=self._clock() - self._last_sample, alpha=self.config.alpha)

    @property
    def stale(self) -> bool:
        return self.estimate().age_s > self.config.stale_after_s


class Prober:
    """Background health probes every `interval_s` while the link is idle: RTT (and, paired, bandwidth)
    samples while the device runs locally, and the liveness of a server the generator gave up on (so it
    can come back to it). While generation traffic flows, that traffic is the measurement and probes
    pause: a probe queued behind a 200 KB answer on a slow link would report the queue as RTT.

    `probe` is a zero-argument callable that raises CloudError when the server is unreachable (e.g. a
    bound `CloudClient.health`); it is timed here. `sized`, if given, runs right after every
    `sized_every`-th successful probe with that probe's RTT in ms (a probe pair: a larger request whose
    bandwidth sample is taken relative to that RTT). `busy` says a generation request is in flight.
    Bounded: a daemon thread that stops on `stop()`.
    """

    def __init__(self, probe: Callable[[], object], estimator: NetworkEstimator, interval_s: float = 0.5,
                 sized: Callable[[float], None] | None = None, sized_every: int = 4,
                 busy: Callable[[], bool] = lambda: False) -> None:
        if not math.isfinite(interval_s) or interval_s <= 0:
            raise ConfigError(f"probe interval must be > 0 s, found {interval_s}")
        if sized_every < 1:
            raise ConfigError(f"sized_every must be >= 1, found {sized_every}")
        self.probe, self.estimator, self.interval_s = probe, estimator, interval_s
        self.sized, self.sized_every, self._ok, self.busy = sized, sized_every, 0, busy
        self.healthy = True
        self.last_ok_sent = float("-inf")  # time.monotonic() at which the last successful probe was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgellm-offload-prober", daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def probe_once(self, sized: bool = False) -> bool:
        """One health probe (and its sized pair when due, or when `sized`); False if it failed."""
        sent = time.monotonic()
        t0 = time.perf_counter()
        try:
            self.probe()
        except CloudError as exc:
            log.debug("health probe failed: %s", exc)
            self.healthy = False
            return False
        rtt_s = time.perf_counter() - t0
        self.estimator.observe_rtt(rtt_s)
        self.healthy, self.last_ok_sent = True, sent
        self._ok += 1
        if self.sized is not None and (sized or self._ok % self.sized_every == 0):
            try:
                self.sized(rtt_s * 1e3)
            except CloudError as exc:
                log.debug("sized probe failed: %s", exc)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.healthy and (self.busy() or self.estimator.traffic_age_s() < self.interval_s):
                continue  # generation traffic is measuring the link right now
            self.probe_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
