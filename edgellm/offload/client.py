"""The device's handle on the cloud service: a CloudClient (one keep-alive HTTP connection) and RemoteSession,
a Session whose layers [start, n_layers) + head run on the server.

Failures map onto three errors the planner acts on: CloudUnavailableError (refused, timed out, 503 and any
5xx, and 429/507 "full": go local), CloudSessionLostError (404/410: rebuild the KV elsewhere),
CloudRejectedError (any other 4xx: a bug or a misconfiguration). Every request records a RequestTiming so a
network estimator can learn RTT and bandwidth from real traffic (wall time minus the server's compute time).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgellm.errors import (
    CloudError,
    CloudRejectedError,
    CloudSessionLostError,
    CloudUnavailableError,
    ConfigError,
    missing_extra,
)
from edgellm.offload import wire
from edgellm.runtime.backend import LayerRange, Session

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("httpx", "serve") from exc

log = logging.getLogger(__name__)
SERVER_MS_HEADER = "X-Edgellm-Server-Ms"
KV = tuple[np.ndarray, np.ndarray]  # (K, V), each float32 (position, n_kv_heads, head_dim)


@dataclass(frozen=True)
class RequestTiming:
    """One request as the network saw it; server_s is None when the server did not report compute time."""

    bytes_sent: int
    bytes_received: int
    wall_s: float
    server_s: float | None

    @property
    def network_s(self) -> float:
        return max(self.wall_s - (self.server_s or 0.0), 0.0)


class StalePositionError(CloudRejectedError):
    """409 stale_position: the server's session holds `server_position` tokens, not what the request said."""

    def __init__(self, message: str, server_position: int) -> None:
        super().__init__(message)
        self.server_position = server_position


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


def _header_bytes(headers: Any) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw)


class CloudClient:
    """One server: health, capabilities, sessions. dtype is how hidden states travel (float32 is exact)."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 10.0, dtype: str = "float32") -> None:
        if dtype not in wire.FLOAT_DTYPES:
            raise ConfigError(f"hidden-state dtype {dtype!r} unsupported; valid: {', '.join(wire.FLOAT_DTYPES)}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, found {timeout_s}")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"offload URL {url!r} must start with http:// or https://")
        self.url, self.dtype, self.timeout_s = url.rstrip("/"), dtype, timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # TCP_NODELAY: headers and body leave in two writes; with Nagle on, the body waits for the server's
        # delayed ACK (~40 ms per request on Linux), which would dwarf a decode step.
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4, keepalive_expiry=60.0))
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)))
        self.last_timing: RequestTiming | None = None
        self._capabilities: dict[str, Any] | None = None

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport ----------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json_body: Any = None, content: bytes | None = None,
                params: Mapping[str, Any] | None = None, session: bool = False) -> httpx.Response:
        """One request; raises the CloudError that fits. session=True: 404/410 mean the session is lost."""
        headers = {}
        if json_body is not None:
            content, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        elif content is not None:
            headers["Content-Type"] = wire.CONTENT_TYPE
        what = f"{method} {self.url}{path}"
        t0 = time.perf_counter()
        try:
            request = self._http.build_request(method, path, content=content, params=params, headers=headers)
            response = self._http.send(request)
        except httpx.TimeoutException:
            raise CloudUnavailableError(f"{what}: no answer within {self.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise CloudUnavailableError(f"{what}: {type(exc).__name__}: {_one_line(exc) or 'connection failed'}") \
                from None
        server_ms = response.headers.get(SERVER_MS_HEADER)
        self.last_timing = RequestTiming(
            bytes_sent=len(content or b"") + _header_bytes(request.headers) + len(method) + len(str(request.url)),
            bytes_received=len(response.content) + _header_bytes(response.headers),
            wall_s=time.perf_counter() - t0,
            server_s=float(server_ms) / 1e3 if server_ms else None,
        )
        if response.status_code >= 400:
            raise self._error(what, response, session)
        return response

    @staticmethod
    def _error(what: str, response: httpx.Response, session: bool) -> CloudError:
        status = response.status_code
        try:
            body = response.json()
            code, detail = body.get("error", "?"), body.get("detail", "")
        except (ValueError, AttributeError):
            body, code, detail = {}, "?", _one_line(response.text)
        message = f"{what}: {status} {code}: {detail}"
        if status in (429, 507) or status >= 500:  # busy, full, draining or broken: not this request's fault
            retry = response.headers.get("Retry-After")
            return CloudUnavailableError(message + (f" (retry after {retry} s)" if retry else ""))
        if session and status in (404, 410):
            return CloudSessionLostError(message)
        if status == 409 and isinstance(body.get("position"), int):
            return StalePositionError(message, body["position"])
        return CloudRejectedError(message)

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request whose answer must be a JSON object (anything else: not an edgellm server)."""
        response = self.request(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise CloudRejectedError(f"{method} {self.url}{path}: answer is not a JSON object: "
                                     f"{_one_line(response.text)[:100]!r}")
        return data

    # -- endpoints ----------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.json("GET", "/v1/health")

    def capabilities(self, refresh: bool = False) -> dict[str, Any]:
        """Model identity, shapes, limits and the server's measured per-layer profile (cached)."""
        if self._capabilities is None or refresh:
            self._capabilities = self.json("GET", "/v1/capabilities")
        return self._capabilities

    def open_session(self, start: int, max_tokens: int, *, model_sha256: str | None = None) -> RemoteSession:
        """A server session for layers [start, n_layers) + head. Pass the device model's sha256 so a server
        holding a different model refuses (409); None trusts the server's own checksum."""
        caps = self.capabilities()
        body = {"model_sha256": model_sha256 or caps["model_sha256"], "start": start, "max_tokens": max_tokens}
        info = self.json("POST", "/v1/sessions", json_body=body)
        return RemoteSession(self, info, caps)


class RemoteSession(Session):
    """Layers [start, n_layers) + head on the server, behind the Session contract (position tracked here)."""

    def __init__(self, client: CloudClient, info: Mapping[str, Any], capabilities: Mapping[str, Any]) -> None:
        n = int(capabilities["n_layers"])
        super().__init__(LayerRange(int(info["start"]), n, n), int(info["max_tokens"]))
        self.client = client
        self.session_id = str(info["session_id"])
        self.position = int(info["position"])
        self.vocab_size = int(capabilities["vocab_size"])
        self.hidden_size = int(capabilities["hidden_size"])
        self.closed = False

    @property
    def last_timing(self) -> RequestTiming | None:
        return self.client.last_timing

    @property
    def _path(self) -> str:
        return f"/v1/sessions/{self.session_id}"

    def _payload(self, inputs: np.ndarray) -> bytes:
        if self.layers.takes_tokens:
            return wire.encode_tensor(np.asarray(inputs, dtype=np.int32))  # ids checked against the vocab already
        x = np.asarray(inputs, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ConfigError(f"hidden states must be (T, {self.hidden_size}), found {x.shape}")
        return wire.encode_tensor(x, self.client.dtype)

    def _post_forward(self, inputs: np.ndarray, output: str, all_logits: bool) -> np.ndarray:
        response = self.client.request(
            "POST", f"{self._path}/forward", content=self._payload(inputs), session=True,
            params={"position": self.position, "output": output, "all": str(all_logits).lower()})
        allowed, ndim = (("int32",), 1) if output == "token" else (("float32",), 2)
        try:
            return wire.decode_tensor(response.content, allowed=allowed, ndim=ndim, what="server answer")
        except wire.PayloadError as exc:
            raise CloudRejectedError(f"{self.client.url}: malformed answer: {exc}") from None

    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray:
        logits = self._post_forward(inputs, "logits", all_logits)
        rows = int(inputs.shape[0]) if all_logits else 1
        if logits.shape != (rows, self.vocab_size):
            raise CloudRejectedError(f"{self.client.url}: logits {logits.shape}, expected {(rows, self.vocab_size)}")
        return logits

    def next_token(self, inputs: np.ndarray) -> int:
        """Advance like forward() but bring back only the argmax token id (4 bytes, not vocab x 4): greedy decode."""
        n = int(np.asarray(inputs).shape[0])
        if n == 0 or self.position + n > self.max_tokens:
            raise ConfigError(f"next_token needs 1..{self.max_tokens - self.position} positions, found {n}")
        token = self._post_forward(inputs, "token", False)
        self.position += n
        return int(token[0])

    def _truncate(self, n_tokens: int) -> None:
        self.client.request("PATCH", self._path, json_body={"start": self.layers.start, "position": n_tokens},
                            session=True)

    def move_split(self, new_start: int, position: int, kv: Mapping[int, KV] | None = None,
                   token_ids: Sequence[int] | None = None) -> None:
        """Move the split to new_start at `position` tokens. Layers joining the server take `kv` (uploaded first,
        float32 (position, n_kv_heads, head_dim) per layer) or are recomputed there from `token_ids`."""
        if kv:
            self._upload_kv(kv)
        body: dict[str, Any] = {"start": new_start, "position": position}
        if token_ids is not None:
            body["token_ids"] = [int(t) for t in token_ids]
        info = self.client.json("PATCH", self._path, json_body=body, session=True)
        n = self.layers.n_layers
        self.layers = LayerRange(int(info["start"]), n, n)
        self.position = int(info["position"])

    def _upload_kv(self, kv: Mapping[int, KV]) -> None:
        """PUT the KV in as few requests as the server's request-size limit allows (the server stages them all)."""
        layers = sorted(kv)
        if layers != list(range(layers[0], layers[-1] + 1)):
            raise ConfigError(f"KV to upload must cover contiguous layers, found {layers}")
        limit = int(self.client.capabilities()["limits"]["max_request_bytes"])
        arrays = {i: [np.asarray(a, dtype=np.float32) for a in kv[i]] for i in layers}
        # ELTS header 8 bytes; per tensor: u32 length + 8-byte ELT1 header + 3 dims x u32 + data
        cost = {i: sum(24 + a.nbytes for a in arrays[i]) for i in layers}
        batches, size = [[]], 8
        for i in layers:
            if batches[-1] and size + cost[i] > limit:
                batches.append([])
                size = 8
            batches[-1].append(i)
            size += cost[i]
        for batch in batches:  # a single layer over the limit still goes: the server's 413 says so
            self.client.request("PUT", f"{self._path}/kv", session=True,
                                params={"start": batch[0], "stop": batch[-1] + 1},
                                content=wire.encode_tensors([a for i in batch for a in arrays[i]], "float32"))

    def download_kv(self, start: int, stop: int) -> dict[int, KV]:
        """K and V of server layers [start, stop) for every cached position, float32 (position, heads, head_dim)."""
        response = self.client.request("GET", f"{self._path}/kv", params={"start": start, "stop": stop},
                                       session=True)
        try:
            tensors = wire.decode_tensors(response.content, count=2 * (stop - start), allowed=("float32",), ndim=3)
        except wire.PayloadError as exc:
            raise CloudRejectedError(f"{self.client.url}: malformed KV answer: {exc}") from None
        return {start + i: (tensors[2 * i], tensors[2 * i + 1]) for i in range(stop - start)}

    def close(self) -> None:
        """Delete the server session (best effort: a lost or unreachable server has nothing left to free)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.client.request("DELETE", self._path, session=True)
        except CloudError as exc:
            log.info("closing remote session %s: %s", self.session_id, exc)
