"""The server's sessions: who holds which layers' KV, how many bytes that reserves, and when they expire.

Memory is reserved from the KV arithmetic *before* anything is allocated, so a request that would break
the per-session or total bound is refused (507) instead of growing the process until it is killed.
Expired ids are remembered (a bounded set) so a late request learns 410 "expired" rather than 404.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgellm.runtime.backend import Session

REMEMBERED_EXPIRED = 4096


class ApiError(Exception):
    """An HTTP answer with a JSON body {"error": code, "detail": one line, **extra}."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra


def kv_bytes(n_layers: int, n_tokens: int, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of keys + values for n_layers x n_tokens positions."""
    return 2 * n_layers * n_tokens * n_kv_heads * head_dim * itemsize


@dataclass(eq=False)
class ServerSession:
    """One device's session: its backend Session for layers [start, n_layers) and KV staged to join it."""

    id: str
    session: Session
    max_tokens: int
    reserved_bytes: int
    last_used: float
    staged: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # layer -> (K, V)
    staged_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: str | None = None  # "deleted" or "expired" once removed from the store

    @property
    def start(self) -> int:
        return self.session.layers.start


class SessionStore:
    """Sessions by id, with the max_sessions / per-session / total byte bounds and idle expiry."""

    def __init__(self, max_sessions: int, max_session_bytes: int, max_total_bytes: int, idle_expiry_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.max_session_bytes = max_session_bytes
        self.max_total_bytes = max_total_bytes
        self.idle_expiry_s = idle_expiry_s
        self.clock = clock
        self._sessions: dict[str, ServerSession] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # guards the dict and total_bytes; never held during compute
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def reserve(self, n_bytes: int, session_bytes: int | None = None) -> None:
        """Take n_bytes from the total budget; session_bytes (the session's new size) is checked per session."""
        if session_bytes is not None and session_bytes > self.max_session_bytes:
            raise ApiError(507, "session_memory", f"session needs {session_bytes} KV bytes, over the per-session "
                           f"bound of {self.max_session_bytes}; ask for fewer max_tokens or layers")
        with self._lock:
            if self.total_bytes + n_bytes > self.max_total_bytes:
                raise ApiError(507, "server_memory", f"{n_bytes} more KV bytes would exceed the server's bound "
                               f"({self.total_bytes} of {self.max_total_bytes} in use); retry later or elsewhere")
            self.total_bytes += n_bytes

    def release(self, n_bytes: int) -> None:
        with self._lock:
            self.total_bytes -= n_bytes

    def add(self, open_session: Callable[[], Session], n_bytes: int, max_tokens: int) -> ServerSession:
        """Reserve, then open (outside the lock: allocation may take a while) and register a session."""
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ApiError(429, "too_many_sessions", f"the server holds its maximum of {self.max_sessions} "
                               "sessions; retry later", headers={"Retry-After": "1"})
        self.reserve(n_bytes, n_bytes)
        try:
            session = open_session()
        except BaseException:
            self.release(n_bytes)
            raise
        entry = ServerSession(secrets.token_urlsafe(16), session, max_tokens, n_bytes, self.clock())
        with self._lock:
            if len(self._sessions) >= self.max_sessions:  # lost a race with another create
                self.total_bytes -= n_bytes
                raise ApiError(429, "too_many_sessions", f"the server holds its maximum of {self.max_sessions} "
                               "sessions; retry later", headers={"Retry-After": "1"})
            self._sessions[entry.id] = entry
        return entry

    def get(self, session_id: str) -> ServerSession:
        """The live session, touched; 410 if it expired, 404 if it never existed or was deleted."""
        self.sweep()
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                if session_id in self._expired:
                    raise ApiError(410, "session_expired", f"session {session_id} expired after "
                                   f"{self.idle_expiry_s:g} s idle; open a new one and rebuild its KV")
                raise ApiError(404, "unknown_session", f"no session {session_id!r} on this server")
            entry.last_used = self.clock()
            return entry

    @staticmethod
    def check_open(entry: ServerSession) -> None:
        """Called with entry.lock held: the session may have been removed while the request waited."""
        if entry.closed == "expired":
            raise ApiError(410, "session_expired", f"session {entry.id} expired")
        if entry.closed:
            raise ApiError(404, "unknown_session", f"session {entry.id} was deleted")

    def remove(self, entry: ServerSession, reason: str) -> None:
        """Forget a session and free its bytes; call with entry.lock held (or when nobody can hold it)."""
        with self._lock:
            if self._sessions.pop(entry.id, None) is None:
                return
            self.total_bytes -= entry.reserved_bytes + entry.staged_bytes
            if reason == "expired":
                self._expired[entry.id] = None
                while len(self._expired) > REMEMBERED_EXPIRED:
                    self._expired.popitem(last=False)
        entry.closed = reason
        entry.staged.clear()

    def sweep(self) -> int:
        """Expire sessions idle longer than idle_expiry_s (skipping ones busy in a request); returns the count."""
        now = self.clock()
        with self._lock:
            idle = [e for e in self._sessions.values() if now - e.last_used > self.idle_expiry_s]
        expired = 0
        for entry in idle:
            if entry.lock.acquire(blocking=False):
                try:
                    if self.clock() - entry.last_used > self.idle_expiry_s:
                        self.remove(entry, "expired")
                        expired += 1
                finally:
                    entry.lock.release()
        return expired
