"""The shaping proxy on real loopback sockets: rate within tolerance, delay added, stall/drop/refuse work."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest

from edgellm.errors import ConfigError
from edgellm.offload.shaping_proxy import ShapingProxy

RATE_TOLERANCE = 0.15  # measured throughput within 15 % of the set rate (1 s transfers on a shared VM)


class EchoServer:
    """Echoes every byte back; 'sink' mode instead counts bytes and answers b'ok' after `expect` bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                head = conn.recv(1)
                if head == b"S":  # sink: 8-byte length, then that many bytes; answer b"ok"
                    n = int.from_bytes(_recv_exact(conn, 8), "big")
                    _recv_exact(conn, n)
                    conn.sendall(b"ok")
                elif head == b"G":  # generate: 8-byte length, send that many bytes
                    n = int.from_bytes(_recv_exact(conn, 8), "big")
                    conn.sendall(b"x" * n)
                while head:
                    if head not in (b"S", b"G"):
                        conn.sendall(head)
                    head = conn.recv(65536)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = conn.recv(min(1 << 20, n - got))
        if not b:
            raise ConnectionError("closed early")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


@pytest.fixture()
def echo():
    server = EchoServer()
    yield server
    server.close()


def _connect(proxy: ShapingProxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


@pytest.mark.parametrize("rate_mbps", [8.0, 40.0])
def test_uplink_throughput_matches_rate(echo, rate_mbps):
    n = int(rate_mbps * 125_000 * 0.8)  # ~0.8 s at the set rate
    with ShapingProxy("127.0.0.1", echo.port, rate_mbps=rate_mbps) as proxy, _connect(proxy) as s:
        t0 = time.perf_counter()
        s.sendall(b"S" + n.to_bytes(8, "big") + b"y" * n)
        assert _recv_exact(s, 2) == b"ok"
        elapsed = time.perf_counter() - t0
    measured = n * 8 / elapsed / 1e6
    assert abs(measured - rate_mbps) / rate_mbps < RATE_TOLERANCE, \
        f"set {rate_mbps} Mbit/s, measured {measured:.2f} Mbit/s over {n} bytes in {elapsed:.3f} s"


def test_downlink_throughput_and_live_rate_change(echo):
    n = 1_000_000  # 1 MB: 0.5 s at 16 Mbit/s, then 0.25 s at 32 Mbit/s
    with ShapingProxy("127.0.0.1", echo.port, rate_mbps=16.0) as proxy:
        times = []
        for rate in (16.0, 32.0):
            proxy.set(rate_mbps=rate)
            with _connect(proxy) as s:
                t0 = time.perf_counter()
                s.sendall(b"G" + n.to_bytes(8, "big"))
                _recv_exact(s, n)
                times.append(time.perf_counter() - t0)
    for rate, elapsed in zip((16.0, 32.0), times, strict=True):
        measured = n * 8 / elapsed / 1e6
        assert abs(measured - rate) / rate < RATE_TOLERANCE, f"set {rate}, measured {measured:.2f} Mbit/s"


def test_added_delay_is_one_way_per_direction(echo):
    delay_ms = 40.0
    with ShapingProxy("127.0.0.1", echo.port) as proxy, _connect(proxy) as s:
        s.sendall(b"E")
        _recv_exact(s, 1)  # connection warm
        base = _median_rtt_ms(s)
        proxy.set(delay_ms=delay_ms)
        shaped = _median_rtt_ms(s)
    added = shaped - base
    assert abs(added - 2 * delay_ms) < 10.0, f"expected +{2 * delay_ms} ms RTT, measured +{added:.1f} ms"


def _median_rtt_ms(s: socket.socket, n: int = 7) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(b"p")
        _recv_exact(s, 1)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def test_stall_holds_bytes_until_resume(echo):
    with ShapingProxy("127.0.0.1", echo.port) as proxy, _connect(proxy) as s:
        proxy.stall()
        s.sendall(b"q")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(1)
        proxy.resume()
        s.settimeout(5)
        assert s.recv(1) == b"q"


def test_drop_and_refuse_connections(echo):
    with ShapingProxy("127.0.0.1", echo.port) as proxy:
        with _connect(proxy) as s:
            s.sendall(b"a")
            assert s.recv(1) == b"a"
            proxy.drop_connections()
            s.settimeout(5)
            try:
                got = s.recv(1)
            except ConnectionResetError:
                got = b""
            assert got == b"", "a dropped connection must be closed"
        proxy.refuse_connections()
        with _connect(proxy) as s:
            s.settimeout(5)
            try:
                got = s.recv(1)
            except ConnectionResetError:
                got = b""
            assert got == b""
        proxy.refuse_connections(False)
        with _connect(proxy) as s:
            s.sendall(b"b")
            assert s.recv(1) == b"b"


def test_invalid_settings_rejected(echo):
    with pytest.raises(ConfigError, match="rate"):
        ShapingProxy("127.0.0.1", echo.port, rate_mbps=0.0)
    with ShapingProxy("127.0.0.1", echo.port) as proxy, pytest.raises(ConfigError, match="delay"):
        proxy.set(delay_ms=-1.0)
