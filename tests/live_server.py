"""A real uvicorn server on loopback for the offload tests, started from a thread on a socket bound first
(so the port is known before it starts)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class LiveServer:
    """uvicorn serving `app`; `stop()` shuts down gracefully, `kill()` cuts open connections at once."""

    def __init__(self, app) -> None:
        self.app = app
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without
        # it every response waits ~40 ms for a delayed ACK between its header and body writes
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=1, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._join()

    def kill(self) -> None:
        """Stop serving now: open connections are cut, nobody listens on the port any more."""
        self.server.force_exit = self.server.should_exit = True
        self._join()

    def _join(self) -> None:
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive(), "test server did not stop"
