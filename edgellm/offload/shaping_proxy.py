"""A TCP proxy on loopback that shapes the link to the cloud service: bandwidth, delay, stalls, drops.

This kernel has no netem (see shared/notes/network.md), so latency, stalls and dropped connections come
from here, and so does bandwidth when network namespaces are not available. Each direction is a link:

    client ──► read chunk ──► token bucket (rate, burst) ──► delay line (+delay_ms) ──► write ──► server
    client ◄── write ◄── delay line ◄── token bucket ◄── read chunk ◄────────────────────────── server

The bucket is shared by every connection in that direction (one link, as a real bottleneck is) and
charges each chunk before it is queued, so the last byte of a message leaves after size / rate, not
after a whole chunk's worth of slack. Delay is one way: a request/response gains 2 x delay_ms of RTT.
Every control can change while traffic flows (`set`, `stall`, `resume`, `drop_connections`,
`refuse_connections`). Bounded: a connection cap, a bounded queue per direction (back-pressure to the
sender), and a lifetime after which the proxy stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass

from edgellm.errors import ConfigError

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 1024
BURST_S = 0.005  # default burst: 5 ms at the set rate (one MTU at the least)
_EOF = b""


@dataclass(frozen=True)
class ProxyLimits:
    """Bounds so that a test can never leave a runaway proxy behind."""

    max_connections: int = 256
    max_queued_chunks: int = 4096  # per direction of a connection: 64 MiB at 16 KiB chunks
    lifetime_s: float = 900.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_queued_chunks < 1 or self.lifetime_s <= 0:
            raise ConfigError("proxy limits must be positive")


class TokenBucket:
    """Bytes may leave at `rate_mbps` on average with bursts of `burst_bytes` (None: 2 ms at the rate, at
    least one 1500-byte MTU); a rate of None is unlimited."""

    def __init__(self, rate_mbps: float | None, burst_bytes: int | None = None) -> None:
        self.rate_mbps, self.fixed_burst = rate_mbps, burst_bytes
        self.tokens = float(self.burst_bytes)
        self.stamp = time.monotonic()

    @property
    def burst_bytes(self) -> int:
        if self.fixed_burst is not None:
            return self.fixed_burst
        return max(1500, int((self.rate_mbps or 0.0) * 125_000 * BURST_S))

    def _refill(self) -> None:
        now = time.monotonic()
        if self.rate_mbps is not None:
            self.tokens = min(float(self.burst_bytes), self.tokens + (now - self.stamp) * self.rate_mbps * 125_000)
        self.stamp = now

    async def take(self, n: int) -> None:
        """Charge n bytes, then wait until the bucket is out of debt (at the rate in force meanwhile)."""
        self._refill()
        if self.rate_mbps is None:
            return
        self.tokens -= n
        while self.tokens < 0 and self.rate_mbps is not None:
            await asyncio.sleep(min(0.05, -self.tokens / (self.rate_mbps * 125_000)))
            self._refill()


class ShapingProxy:
    """Listen on `listen_host:listen_port` (0: any free port) and forward to `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, rate_mbps: float | None = None, delay_ms: float = 0.0,
                 burst_bytes: int | None = None, limits: ProxyLimits = ProxyLimits()) -> None:
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.limits = limits
        self._check(rate_mbps, delay_ms, burst_bytes)
        self.delay_ms = delay_ms
        self._up = TokenBucket(rate_mbps, burst_bytes)  # client -> server
        self._down = TokenBucket(rate_mbps, burst_bytes)  # server -> client
        self.refusing = False
        self.bytes_up = self.bytes_down = self.connections_total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._running: asyncio.Event | None = None  # cleared while stalled
        self._conns: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    @staticmethod
    def _check(rate_mbps: float | None, delay_ms: float, burst_bytes: int | None) -> None:
        if rate_mbps is not None and not (math.isfinite(rate_mbps) and rate_mbps > 0):
            raise ConfigError(f"proxy rate must be > 0 Mbit/s or None (unlimited), found {rate_mbps}")
        if not (math.isfinite(delay_ms) and delay_ms >= 0):
            raise ConfigError(f"proxy delay must be >= 0 ms, found {delay_ms}")
        if burst_bytes is not None and burst_bytes < 1:
            raise ConfigError(f"proxy burst must be >= 1 byte, found {burst_bytes}")

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> ShapingProxy:
        self._thread = threading.Thread(target=self._serve, name="edgellm-shaping-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0) or self._error is not None:
            raise ConfigError(f"shaping proxy did not start on {self.listen}: {self._error}")
        return self

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.port}"

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._running = asyncio.Event()
            self._running.set()
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, *self.listen))
            self.port = self._server.sockets[0].getsockname()[1]
            loop.call_later(self.limits.lifetime_s, loop.stop)
            self._ready.set()
            loop.run_forever()
        except OSError as exc:
            self._error = exc
            self._ready.set()
        finally:
            self._shutdown(loop)

    def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        for w in list(self._conns):
            _abort(w)
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    # --- live controls (thread-safe) ---------------------------------------------------------------------
    def set(self, *, rate_mbps: float | None | str = "keep", delay_ms: float | None = None) -> None:
        """Change the rate (None: unlimited) and/or the one-way delay of both directions, now."""
        rate = self._up.rate_mbps if rate_mbps == "keep" else rate_mbps
        delay = self.delay_ms if delay_ms is None else delay_ms
        self._check(rate, delay, self._up.fixed_burst)  # type: ignore[arg-type]
        for bucket in (self._up, self._down):
            bucket._refill()
            bucket.rate_mbps = rate  # type: ignore[assignment]
        self.delay_ms = delay

    @property
    def rate_mbps(self) -> float | None:
        return self._up.rate_mbps

    def stall(self) -> None:
        """Hold every byte in both directions (connections stay open): a hung server or a dead link."""
        self._call(lambda: self._running.clear())  # type: ignore[union-attr]

    def resume(self) -> None:
        self._call(lambda: self._running.set())  # type: ignore[union-attr]

    def drop_connections(self) -> None:
        """Reset every open connection (as a crashed server or a NAT timeout would)."""
        self._call(lambda: [_abort(w) for w in list(self._conns)])

    def refuse_connections(self, refuse: bool = True) -> None:
        """Accept and immediately reset new connections (an unreachable server) while set."""
        self.refusing = refuse

    def _call(self, fn) -> None:
        if self._loop is None or not self._loop.is_running():
            raise ConfigError("the shaping proxy is not running")
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5.0)

    # --- data path ------------------------------------------------------------------------------------
    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.refusing or len(self._conns) >= 2 * self.limits.max_connections:
            _abort(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(client_w)
            return
        self.connections_total += 1
        self._conns.update((client_w, server_w))
        try:
            await asyncio.gather(self._pipe(client_r, server_w, self._up, "up"),
                                 self._pipe(server_r, client_w, self._down, "down"))
        except asyncio.CancelledError:  # the proxy is stopping
            pass
        finally:
            for w in (client_w, server_w):
                self._conns.discard(w)
                with contextlib.suppress(Exception):
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket,
                    direction: str) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.limits.max_queued_chunks)
        deliver = asyncio.ensure_future(self._deliver(queue, writer))
        try:
            while True:
                await self._running.wait()  # type: ignore[union-attr]
                try:
                    data = await reader.read(CHUNK_BYTES)
                except (ConnectionError, OSError):
                    data = _EOF
                if data:
                    await bucket.take(len(data))
                    if direction == "up":
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                await queue.put((time.monotonic() + self.delay_ms / 1e3, data))
                if not data:
                    break
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        while True:
            at, data = await queue.get()
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._running.wait()  # type: ignore[union-attr]
            if not data:  # the other side closed: half-close this one after what was queued before
                with contextlib.suppress(Exception):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                return


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()
