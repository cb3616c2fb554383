"""The offload server in its own process, and a load test: N device sessions at once against it.

`ServerProcess` runs `edgellm serve-cloud` (its real entry point) on a free port and reads its resident
memory from /proc. `load_test` opens N sessions, each in its own thread with its own client, and decodes
T tokens all-cloud (token ids in, argmax ids out), recording every request's latency and the server's
RSS as it goes: p50/p99 per-token latency, errors, peak RSS.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import BenchmarkError, CloudError

_SERVE = ("import sys; from edgellm.cli.main import OneLineErrorParser; from edgellm.cli import serve_command; "
          "p = OneLineErrorParser(prog='edgellm'); serve_command.register(p.add_subparsers(dest='command')); "
          "sys.exit(serve_command.run(p.parse_args(sys.argv[1:])))")


class ServerProcess:
    """`edgellm serve-cloud MODEL --port 0` in a subprocess; `url` once it listens. Always killed on exit."""

    def __init__(self, model: str | None, token: str, threads: int = 1, max_sessions: int = 64,
                 start_timeout_s: float = 180.0) -> None:
        self.args = [*([model] if model else []), "--port", "0", "--threads", str(threads),
                     "--max-sessions", str(max_sessions)]
        self.token, self.threads, self.start_timeout_s = token, threads, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log: list[str] = []

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "EDGELLM_TOKEN": self.token, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, "serve-cloud", *self.args], env=env,
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + self.start_timeout_s
        while not self.url:
            line = self.proc.stderr.readline()
            if (not line and self.proc.poll() is not None) or time.monotonic() > deadline:
                self.__exit__()
                raise BenchmarkError("serve-cloud did not start: " + " | ".join(self._log[-5:]))
            self._log.append(line.strip())
            if "Uvicorn running on" in line:
                self.url = line.split("Uvicorn running on ")[1].split()[0]
        threading.Thread(target=self._drain, daemon=True).start()  # keep its stderr pipe from filling
        return self

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._log.append(line.strip())
            del self._log[:-200]

    def rss_mb(self) -> float:
        """Resident memory of the server process now (VmRSS), MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@dataclass(frozen=True)
class LoadResult:
    sessions: int
    tokens_per_session: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    tokens_per_s: float
    wall_s: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    error_samples: tuple[str, ...] = ()


def load_test(server: ServerProcess, prompt_ids: Sequence[int], sessions: int = 32, tokens: int = 64,
              sha256: str | None = None, timeout_s: float = 120.0) -> LoadResult:
    """N threads, each a device with its own client and session, decoding `tokens` tokens all-cloud."""
    from edgellm.offload.client import CloudClient
    from edgellm.offload.generate import with_nodelay

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(sessions + 1)

    def device(i: int) -> None:
        with with_nodelay(CloudClient(server.url, server.token, timeout_s=timeout_s)) as client:
            try:
                start.wait()
                remote = client.open_session(0, len(prompt_ids) + tokens, model_sha256=sha256)
                t0 = time.perf_counter()
                token = remote.next_token(list(prompt_ids))
                mine = [(time.perf_counter() - t0) * 1e3]
                for _ in range(tokens - 1):
                    t0 = time.perf_counter()
                    token = remote.next_token([token])
                    mine.append((time.perf_counter() - t0) * 1e3)
                remote.close()
            except (CloudError, threading.BrokenBarrierError) as exc:
                with lock:
                    errors.append(f"session {i}: {exc}")
                return
        with lock:
            latencies.extend(mine[1:])  # decode steps; the first is the prefill

    rss_before = server.rss_mb()
    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    peak = rss_before
    while any(t.is_alive() for t in threads):
        peak = max(peak, server.rss_mb())
        for t in threads:
            t.join(timeout=0.2)
            if t.is_alive():
                break
    wall = time.perf_counter() - t0
    ordered = sorted(latencies) or [float("nan")]
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return LoadResult(sessions, tokens, sessions * tokens, len(errors), statistics.median(ordered), p99,
                      len(latencies) / wall if wall > 0 else 0.0, wall, rss_before, max(peak, server.rss_mb()),
                      server.rss_mb(), tuple(errors[:5]))
