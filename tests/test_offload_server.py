"""The offload cloud service for real: uvicorn on 127.0.0.1 (a free port), driven by CloudClient and raw httpx.

Oracle: the local reference backend running the whole model. A split runs the device's layers [0, K) locally
and the server's [K, n) remotely with float32 hidden states on the wire; the logits must equal the local
ones bit for bit (same float ops in the same order on the same machine). Faults (drain, kill, stall, expiry)
must surface as the documented CloudError subclasses, and a fuzz run against /openapi.json must find no 5xx
other than 503/507 and no undocumented status code.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgellm.errors import CloudRejectedError, CloudSessionLostError, CloudUnavailableError, ConfigError
from edgellm.model.loader import load_model
from edgellm.offload import wire
from edgellm.offload.client import CloudClient, RemoteSession, StalePositionError
from edgellm.offload.identity import model_sha256
from edgellm.offload.server import ServerSettings, create_app
from edgellm.runtime.backend import Backend, LayerRange
from edgellm.runtime.reference import ReferenceBackend
from tests.live_server import LiveServer
from tests.tiny_gguf import write_tiny_gguf

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_LAYERS = 4
KV_BYTES_PER_TOKEN_LAYER = 2 * 2 * 16 * 4  # K and V, 2 kv heads x head_dim 16, float32 (the tiny model)


def raw(method: str, url: str, **kwargs) -> httpx.Response:
    """A bare HTTP request (no CloudClient), patient enough for a loaded CI machine."""
    return httpx.request(method, url, timeout=30.0, **kwargs)


@dataclass
class Tiny:
    backend: Backend
    sha256: str
    path: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    path = write_tiny_gguf(tmp_path_factory.mktemp("offload") / "tiny.gguf", n_layers=N_LAYERS)
    description = load_model(path)
    return Tiny(ReferenceBackend.from_model(description), model_sha256(description), path)


@contextlib.contextmanager
def serve(model: Tiny, **overrides) -> Iterator[LiveServer]:
    settings = ServerSettings(**{"token": TOKEN, "profile": False, **overrides})
    server = LiveServer(create_app(model.backend, "tiny", model.sha256, settings))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live(tiny) -> Iterator[LiveServer]:
    with serve(tiny, max_request_bytes=32 * 1024, max_sessions=64) as server:
        yield server


@pytest.fixture
def client(live) -> Iterator[CloudClient]:
    with CloudClient(live.url, TOKEN) as c:
        yield c


def prompt(n: int, seed: int = 0, vocab: int = 267) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.int64)


def device_with_kv(backend: Backend, stop: int, kv: dict, position: int, max_tokens: int = 32):
    """A device session for layers [0, stop) whose cache is `kv` (layer -> (K, V)) at `position` tokens."""
    session = backend.open_session(LayerRange(0, stop, N_LAYERS), max_tokens)
    session.import_kv(kv, position)
    return session


def local_kv(session, layers) -> dict:
    """Straight from the reference cache tensors (not through read_kv: an oracle of its own)."""
    n = session.position
    return {i: (session.cache.keys[i, :n].numpy().copy(), session.cache.values[i, :n].numpy().copy())
            for i in layers}


# -- correctness of the split ---------------------------------------------------------------------------------
@pytest.mark.parametrize("split", range(N_LAYERS))
def test_split_logits_equal_the_local_model_bit_for_bit(tiny, client, split):
    local = tiny.backend.open_session(max_tokens=64)
    remote = client.open_session(split, 64, model_sha256=tiny.sha256)
    device = tiny.backend.open_session(LayerRange(0, split, N_LAYERS), 64) if split else None

    def step(ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        return remote.forward(device.forward(ids) if device else ids, all_logits=all_logits)

    ids = prompt(7, seed=split)
    np.testing.assert_array_equal(step(ids, all_logits=True), local.forward(ids, all_logits=True))
    token = ids[-1:]
    for _ in range(3):  # greedy decode, one token at a time
        expected = local.forward(token)
        np.testing.assert_array_equal(step(token), expected)
        token = np.array([int(np.argmax(expected))])
    assert remote.position == local.position == 10
    timing = remote.last_timing
    assert timing.bytes_sent > 0 and timing.bytes_received >= 267 * 4 and timing.server_s is not None
    assert 0 <= timing.server_s <= timing.wall_s
    remote.close()


def test_next_token_and_half_precision_hidden_states(tiny, live):
    local = tiny.backend.open_session(max_tokens=16)
    ids = prompt(5, seed=9)
    expected = local.forward(ids)
    with CloudClient(live.url, TOKEN, dtype="bfloat16") as c:
        remote = c.open_session(2, 16)
        device = tiny.backend.open_session(LayerRange(0, 2, N_LAYERS), 16)
        logits = remote.forward(device.forward(ids))
        # bfloat16 keeps 8 bits of mantissa: close, not equal (that is why float32 is the default)
        np.testing.assert_allclose(logits, expected, atol=0.1 * np.abs(expected).max())
    with CloudClient(live.url, TOKEN) as c:
        remote = c.open_session(0, 16)
        assert remote.next_token(ids) == int(np.argmax(expected))
        assert remote.position == 5 and remote.last_timing.bytes_received < 200  # 4 bytes of token, not logits


def test_capabilities_describe_model_and_limits(tiny, client):
    caps = client.capabilities()
    assert caps["model_sha256"] == tiny.sha256 and caps["n_layers"] == N_LAYERS
    assert (caps["hidden_size"], caps["vocab_size"], caps["n_kv_heads"], caps["head_dim"]) == (64, 267, 2, 16)
    assert caps["limits"]["kv_bytes_per_token_per_layer"] == KV_BYTES_PER_TOKEN_LAYER
    assert caps["profile"] is None  # profile=False in these servers; the real-model test checks a measured one
    assert client.health()["status"] == "ok"


# -- KV transfer and split moves ---------------------------------------------------------------------------------
def test_kv_download_equals_the_local_cache(tiny, client):
    local = tiny.backend.open_session(max_tokens=32)
    remote = client.open_session(1, 32)
    ids = prompt(6, seed=3)
    local.forward(ids)
    remote.forward(tiny.backend.open_session(LayerRange(0, 1, N_LAYERS), 32).forward(ids))
    kv = remote.download_kv(1, N_LAYERS)
    assert sorted(kv) == [1, 2, 3]
    for layer, (k, v) in kv.items():
        assert k.shape == v.shape == (6, 2, 16) and k.dtype == np.float32
        np.testing.assert_array_equal(k, local.cache.keys[layer, :6].numpy())
        np.testing.assert_array_equal(v, local.cache.values[layer, :6].numpy())


def test_move_split_down_with_uploaded_kv_continues_exactly(tiny, client):
    """Device held [0, 3), server [3, 4); layers 1 and 2 move to the server with their KV uploaded."""
    local = tiny.backend.open_session(max_tokens=32)
    device = tiny.backend.open_session(LayerRange(0, 3, N_LAYERS), 32)
    remote = client.open_session(3, 32)
    ids = prompt(6, seed=4)
    np.testing.assert_array_equal(remote.forward(device.forward(ids)), local.forward(ids))
    uploaded = local_kv(device, (1, 2))
    remote.move_split(1, 6, kv=uploaded)
    assert (remote.layers.start, remote.position) == (1, 6)
    for layer, (k, v) in remote.download_kv(1, 3).items():
        np.testing.assert_array_equal(k, uploaded[layer][0])
        np.testing.assert_array_equal(v, uploaded[layer][1])
    mine = device_with_kv(tiny.backend, 1, local_kv(device, (0,)), 6)  # the device keeps layer 0 only
    for token in (5, 77):
        nxt = np.array([token])
        np.testing.assert_array_equal(remote.forward(mine.forward(nxt)), local.forward(nxt))


def test_kv_upload_is_split_to_fit_the_request_limit(tiny):
    """Per-layer K+V of 6 positions is 1.6 kB here; with a 2 kB request limit each layer travels alone."""
    with serve(tiny, max_request_bytes=2048) as server, CloudClient(server.url, TOKEN) as c:
        local = tiny.backend.open_session(max_tokens=16)
        device = tiny.backend.open_session(LayerRange(0, 3, N_LAYERS), 16)
        remote = c.open_session(3, 16)
        ids = prompt(6, seed=8)
        np.testing.assert_array_equal(remote.forward(device.forward(ids)), local.forward(ids))
        remote.move_split(0, 6, kv=local_kv(device, (0, 1, 2)))
        assert c.last_timing.bytes_sent < 2048 and remote.layers.start == 0
        np.testing.assert_array_equal(remote.forward(np.array([3])), local.forward(np.array([3])))


def test_move_split_with_server_recompute_and_back_up(tiny, client):
    """Layers join the server by recompute from token ids; then leave it again with their KV downloaded."""
    local = tiny.backend.open_session(max_tokens=32)
    ids = prompt(8, seed=5)
    device = tiny.backend.open_session(LayerRange(0, 3, N_LAYERS), 32)
    remote = client.open_session(3, 32)
    np.testing.assert_array_equal(remote.forward(device.forward(ids)), local.forward(ids))
    remote.move_split(0, 8, token_ids=ids.tolist())  # all-cloud: the server recomputes layers 0..2
    assert remote.layers.start == 0
    # recompute runs the same single 8-token prefill the device ran: identical KV, identical logits
    np.testing.assert_array_equal(remote.forward(np.array([11])), local.forward(np.array([11])))
    mine = device_with_kv(tiny.backend, 2, remote.download_kv(0, 2), 9)  # layers 0, 1 go back to the device
    remote.move_split(2, 9)
    assert (remote.layers.start, remote.position) == (2, 9)
    nxt = np.array([42])
    np.testing.assert_array_equal(remote.forward(mine.forward(nxt)), local.forward(nxt))


def test_move_without_kv_or_token_ids_is_refused_and_truncate_rolls_back(tiny, client):
    remote = client.open_session(2, 16)
    device = tiny.backend.open_session(LayerRange(0, 2, N_LAYERS), 16)
    local = tiny.backend.open_session(max_tokens=16)
    ids = prompt(4, seed=6)
    np.testing.assert_array_equal(remote.forward(device.forward(ids)), local.forward(ids))
    with pytest.raises(CloudRejectedError, match="409 kv_missing: layers 0..1 join the server"):
        remote.move_split(0, 4)
    assert remote.layers.start == 2  # unchanged: the session still works
    for session in (remote, device, local):
        session.truncate(3)
    assert remote.position == 3
    np.testing.assert_array_equal(remote.forward(device.forward(ids[3:])), local.forward(ids[3:]))


# -- refusals: every bad input is a clear 4xx ------------------------------------------------------------------
def test_stale_position_is_409_with_the_current_position(client, live):
    remote = client.open_session(0, 16)
    remote.forward(prompt(3))
    remote.position = 1  # pretend a response was lost and the device retries an old step
    with pytest.raises(StalePositionError, match="409 stale_position") as info:
        remote.forward(prompt(1))
    assert info.value.server_position == 3
    r = raw("POST", f"{live.url}/v1/sessions/{remote.session_id}/forward", params={"position": 0}, headers={
        **AUTH, "Content-Type": wire.CONTENT_TYPE}, content=wire.encode_tensor(np.array([1], np.int32)))
    assert r.status_code == 409 and r.json()["position"] == 3 and r.json()["error"] == "stale_position"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": "Bearer"}, {"Authorization": "Bearer tést".encode()}])
def test_missing_or_wrong_token_is_401(live, headers):
    for method, path in (("GET", "/v1/capabilities"), ("POST", "/v1/sessions"), ("DELETE", "/v1/sessions/x"),
                         ("POST", "/v1/admin/drain")):
        r = raw(method, live.url + path, headers=headers, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer" and r.json()["error"] == "unauthorized"
    assert raw("GET", f"{live.url}/v1/health").status_code == 200  # health needs no token


def test_client_with_wrong_token_is_rejected(live):
    with CloudClient(live.url, "nope") as c, pytest.raises(CloudRejectedError, match="401 unauthorized"):
        c.capabilities()


def test_oversized_bodies_are_413_declared_or_streamed(live, client):
    url = f"{live.url}/v1/sessions/x/forward?position=0"
    headers = {**AUTH, "Content-Type": wire.CONTENT_TYPE}
    r = raw("POST", url, headers=headers, content=bytes(40 * 1024))
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks():  # no Content-Length: chunked transfer, counted as it streams
        for _ in range(5):
            yield bytes(8192)

    r = raw("POST", url, headers=headers, content=chunks())
    assert r.status_code == 413 and "streamed body" in r.json()["detail"]
    remote = client.open_session(1, 256)
    with pytest.raises(CloudRejectedError, match="413 too_large"):
        remote.forward(np.zeros((200, 64), np.float32))  # 51 KB of hidden states
    assert remote.position == 0


def _post_forward(live, session_id, body: bytes, position=0, content_type=wire.CONTENT_TYPE, **params):
    return raw("POST", f"{live.url}/v1/sessions/{session_id}/forward", params={"position": position, **params},
                      headers={**AUTH, "Content-Type": content_type}, content=body)


def test_malformed_payloads_are_400_with_a_reason(live, client):
    hidden_session = client.open_session(2, 16).session_id
    token_session = client.open_session(0, 16).session_id
    nan = np.zeros((1, 64), np.float32)
    nan[0, 5] = np.nan
    cases = [
        (hidden_session, b"\x80\x04\x95" + bytes(40), "bad_magic"),  # a pickle is just bad magic here
        (hidden_session, wire.encode_tensor(nan), "non_finite"),
        (hidden_session, wire.encode_tensor(np.zeros((1, 63), np.float32)), "bad_shape"),
        (hidden_session, wire.encode_tensor(np.zeros(64, np.float32)), "bad_shape"),
        (hidden_session, wire.encode_tensor(np.zeros((1, 64), np.int32)), "bad_dtype"),
        (hidden_session, wire.encode_tensor(np.zeros((2, 64), np.float32))[:-1], "length_mismatch"),
        (token_session, wire.encode_tensor(np.array([1.0], np.float32)), "bad_dtype"),
        (token_session, wire.encode_tensor(np.array([267], np.int32)), "bad_request"),
        (token_session, wire.encode_tensor(np.array([-1], np.int64)), "bad_request"),
        (token_session, wire.encode_tensor(np.zeros(17, np.int32)), "context_overflow"),
        (token_session, b"", "truncated"),
    ]
    for session_id, body, code in cases:
        r = _post_forward(live, session_id, body)
        assert (r.status_code, r.json()["error"]) == (400, code), (code, r.text)
        assert "\n" not in r.json()["detail"]
    r = _post_forward(live, token_session, wire.encode_tensor(np.array([1], np.int32)), content_type="text/plain")
    assert r.status_code == 415
    r = _post_forward(live, token_session, wire.encode_tensor(np.array([1], np.int32)), output="hidden")
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_output")
    for session_id in (hidden_session, token_session):  # nothing was appended by any refused request
        assert client.request("PATCH", f"/v1/sessions/{session_id}", json_body={
            "start": 2 if session_id == hidden_session else 0, "position": 0}).json()["position"] == 0


def test_bad_json_and_bad_ranges(live, client, tiny):
    url = f"{live.url}/v1/sessions"
    for body, status in [({"model_sha256": tiny.sha256, "start": N_LAYERS, "max_tokens": 8}, 422),
                         ({"model_sha256": tiny.sha256, "start": 0, "max_tokens": 10**6}, 422),
                         ({"model_sha256": tiny.sha256, "start": 0}, 422),
                         ({"model_sha256": tiny.sha256, "start": 0, "max_tokens": 8, "extra": 1}, 422),
                         ({"model_sha256": "0" * 64, "start": 0, "max_tokens": 8}, 409)]:
        r = raw("POST", url, headers=AUTH, json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) >= {"error", "detail"}
    r = raw("POST", url, headers={**AUTH, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    with pytest.raises(CloudRejectedError, match="409 model_mismatch"):
        client.open_session(0, 8, model_sha256="f" * 64)
    remote = client.open_session(2, 8)
    with pytest.raises(CloudRejectedError, match="400 bad_range"):
        remote.download_kv(0, 2)  # the device's layers are not on the server
    with pytest.raises(CloudRejectedError, match="409 empty_cache"):
        remote.download_kv(2, 4)
    with pytest.raises(CloudRejectedError, match="400 bad_token_ids"):
        remote.move_split(0, 0, token_ids=[1, 2])
    with pytest.raises(CloudSessionLostError, match="404 unknown_session"):
        RemoteSession(client, {"session_id": "nope", "start": 0, "max_tokens": 8, "position": 0},
                      client.capabilities()).forward(prompt(1))
    assert raw("GET", f"{live.url}/v1/nowhere").json()["error"] == "not_found"
    r = raw("OPTIONS", f"{live.url}/v1/sessions/x/kv", headers=AUTH)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, PUT"


def test_one_step_is_bounded_in_tokens_and_logits(tiny):
    """Transient memory of a step (attention over T x position, T x vocab logits) has its own bounds."""
    with serve(tiny, max_forward_tokens=8, max_response_bytes=4 * 267 * 4) as server, \
            CloudClient(server.url, TOKEN) as c:
        remote = c.open_session(0, 64)
        with pytest.raises(CloudRejectedError, match="400 too_many_tokens: 9 positions in one step"):
            remote.forward(prompt(9))
        with pytest.raises(CloudRejectedError, match="400 response_too_large"):
            remote.forward(prompt(5), all_logits=True)
        assert remote.forward(prompt(4), all_logits=True).shape == (4, 267) and remote.position == 4
        assert c.capabilities()["limits"]["max_forward_tokens"] == 8
        ids = prompt(20, seed=2)  # recompute of 20 positions runs in chunks of 8 and still matches
        local = tiny.backend.open_session(max_tokens=64)
        for i in range(0, 20, 8):
            local.forward(ids[i:i + 8])
        other = c.open_session(3, 64)
        device = tiny.backend.open_session(LayerRange(0, 3, N_LAYERS), 64)
        for i in range(0, 20, 8):
            other.forward(device.forward(ids[i:i + 8]))
        other.move_split(0, 20, token_ids=ids.tolist())
        np.testing.assert_array_equal(other.forward(np.array([7])), local.forward(np.array([7])))


def test_kv_upload_is_validated(tiny, client):
    remote = client.open_session(3, 8)
    good = {1: (np.zeros((2, 2, 16), np.float32),) * 2, 2: (np.zeros((2, 2, 16), np.float32),) * 2}
    with pytest.raises(CloudRejectedError, match="400 bad_shape"):
        remote.move_split(1, 0, kv={1: good[1], 2: (np.zeros((3, 2, 16), np.float32),) * 2})
    with pytest.raises(CloudRejectedError, match="400 bad_range"):
        remote.move_split(3, 0, kv={3: good[1]})  # layer 3 is already on the server
    with pytest.raises(ConfigError, match="contiguous"):
        remote.move_split(0, 0, kv={0: good[1], 2: good[2]})
    r = raw("PUT", f"{client.url}/v1/sessions/{remote.session_id}/kv", params={"start": 1, "stop": 2},
                  headers={**AUTH, "Content-Type": wire.CONTENT_TYPE},
                  content=wire.encode_tensors([np.full((2, 2, 16), np.inf, np.float32)] * 2))
    assert (r.status_code, r.json()["error"]) == (400, "non_finite")


# -- limits: memory, sessions, expiry ------------------------------------------------------------------------------
def test_memory_and_session_bounds(tiny):
    per_token_layer = KV_BYTES_PER_TOKEN_LAYER
    with serve(tiny, max_sessions=3, max_session_bytes=100_000, max_total_bytes=120_000) as server, \
            CloudClient(server.url, TOKEN) as c:
        with pytest.raises(CloudUnavailableError, match="507 session_memory"):
            c.open_session(0, 256)  # 4 layers x 256 tokens x 256 B = 262144 > 100000
        s1 = c.open_session(2, 64)  # 32768
        s2 = c.open_session(0, 64)  # 65536, total 98304
        with pytest.raises(CloudUnavailableError, match="507 server_memory"):
            c.open_session(0, 64)  # would reach 163840 > 120000
        c.open_session(3, 16)  # 4096
        with pytest.raises(CloudUnavailableError, match="429 too_many_sessions"):
            c.open_session(3, 1)
        with pytest.raises(CloudUnavailableError, match="507 server_memory"):
            s1.move_split(0, 0)  # growing 2 -> 4 layers: +32768 > the bound
        assert s1.layers.start == 2
        assert server.app.state.service.store.total_bytes == (2 * 64 + 4 * 64 + 16) * per_token_layer
        s2.close()
        s1.move_split(0, 0)  # fits now
        assert server.app.state.service.store.total_bytes == (4 * 64 + 16) * per_token_layer


def test_idle_sessions_expire_with_410(tiny):
    with serve(tiny, idle_expiry_s=0.3, sweep_interval_s=0.1) as server, CloudClient(server.url, TOKEN) as c:
        remote = c.open_session(0, 8)
        remote.forward(prompt(2))
        time.sleep(0.6)
        assert len(server.app.state.service.store) == 0  # the background sweep freed it
        with pytest.raises(CloudSessionLostError, match="410 session_expired"):
            remote.forward(prompt(1))
        assert server.app.state.service.store.total_bytes == 0
        r = raw("DELETE", f"{server.url}/v1/sessions/{remote.session_id}", headers=AUTH)
        assert r.status_code == 410


def test_concurrent_requests_to_one_session_serialize(tiny, client):
    """Two clients send the same step at once: exactly one is applied, the other is a 409 (never a double append)."""
    remote = client.open_session(0, 64)
    results: list[str] = []

    def step() -> None:
        with CloudClient(client.url, TOKEN) as c:
            twin = RemoteSession(c, {"session_id": remote.session_id, "start": 0, "max_tokens": 64, "position": 0},
                                 c.capabilities())
            try:
                twin.forward(prompt(16))
                results.append("ok")
            except StalePositionError:
                results.append("409")

    threads = [threading.Thread(target=step) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["409", "ok"]


# -- faults: drain (spot preemption), killed, stalled -------------------------------------------------------------
def test_drain_answers_503_and_still_hands_back_kv(tiny):
    with serve(tiny, retry_after_s=7) as server, CloudClient(server.url, TOKEN) as c:
        remote = c.open_session(1, 16)
        device = tiny.backend.open_session(LayerRange(0, 1, N_LAYERS), 16)
        remote.forward(device.forward(prompt(3)))
        assert raw("POST", f"{server.url}/v1/admin/drain", headers=AUTH).json() == {"draining": True}
        with pytest.raises(CloudUnavailableError, match=r"503 draining.*retry after 7 s"):
            remote.forward(device.forward(prompt(1)))
        assert remote.position == 3
        r = raw("GET", f"{server.url}/v1/health")
        assert r.status_code == 503 and r.headers["Retry-After"] == "7"
        with pytest.raises(CloudUnavailableError):
            c.open_session(0, 8)
        assert sorted(remote.download_kv(1, N_LAYERS)) == [1, 2, 3]  # the device can take its layers back
        remote.close()


def test_killed_server_is_unavailable(tiny):
    with serve(tiny) as server:
        c = CloudClient(server.url, TOKEN, timeout_s=2.0)
        remote = c.open_session(0, 8)
        remote.forward(prompt(2))
    with pytest.raises(CloudUnavailableError):  # stopped: its keep-alive connection is gone, nobody listens
        remote.forward(prompt(1))
    assert remote.position == 2
    remote.close()  # best effort, no raise
    c.close()


def test_stalled_server_times_out_as_unavailable():
    with socket.socket() as sock:  # accepts TCP (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        with CloudClient(f"http://127.0.0.1:{sock.getsockname()[1]}", TOKEN, timeout_s=0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(CloudUnavailableError, match="no answer within 0.3 s"):
                c.health()
            assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("status, body, error, match", [
    (502, b"<html>bad gateway</html>", CloudUnavailableError, r"502 \?: <html>bad gateway</html>"),
    (429, b'{"error": "too_many_sessions", "detail": "full"}', CloudUnavailableError, "429 too_many_sessions"),
    (404, b'{"error": "not_found", "detail": "no route"}', CloudRejectedError, "404 not_found"),  # not a session
    (200, b"<html>a captive portal</html>", CloudRejectedError, "not a JSON object"),
])
def test_client_maps_what_a_foreign_or_broken_server_answers(status, body, error, match):
    """What sits between device and server (a proxy, a portal) must map onto the three errors too."""
    c = CloudClient("http://offload.invalid", TOKEN)
    c._http = httpx.Client(base_url=c.url, transport=httpx.MockTransport(lambda _: httpx.Response(status, content=body)))
    with pytest.raises(error, match=match):
        c.health()
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        CloudClient("localhost:8080", TOKEN)


def test_serve_cloud_command_serves_and_a_sigkill_is_unavailable(tiny, tmp_path):
    """The CLI entry point in its own process (as deployed), then killed -9 mid-session."""
    code = ("import sys; from edgellm.cli.main import OneLineErrorParser; from edgellm.cli import serve_command; "
            "p = OneLineErrorParser(prog='edgellm'); serve_command.register(p.add_subparsers(dest='command')); "
            "sys.exit(serve_command.run(p.parse_args(sys.argv[1:])))")
    env = {**os.environ, "EDGELLM_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-c", code, "serve-cloud", str(tiny.path), "--port", "0",
                             "--threads", "1"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if "Uvicorn running on" in line:
                url = line.split("Uvicorn running on ")[1].split()[0]
        assert url, "serve-cloud did not start"
        with CloudClient(url, TOKEN) as c:
            caps = c.capabilities()
            assert len(caps["profile"]["layer_ms_decode"]) == N_LAYERS  # measured at start-up
            assert caps["model_sha256"] == tiny.sha256
            remote = c.open_session(0, 8, model_sha256=tiny.sha256)
            remote.forward(prompt(2))
            proc.kill()
            proc.wait(timeout=10)
            with pytest.raises(CloudUnavailableError):
                remote.forward(prompt(1))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()


def test_serve_cloud_refuses_to_start_without_a_token(monkeypatch, capsys):
    from edgellm.cli import serve_command
    from edgellm.cli.main import OneLineErrorParser

    parser = OneLineErrorParser(prog="edgellm")
    serve_command.register(parser.add_subparsers(dest="command"))
    monkeypatch.delenv("EDGELLM_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="needs a bearer token: pass --token T or set EDGELLM_TOKEN"):
        serve_command.run(parser.parse_args(["serve-cloud"]))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["serve-cloud", "--port", "70000"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a port in 0..65535" in err


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="needs a bearer token"):
        ServerSettings()
    with pytest.raises(ConfigError, match="max_sessions must be > 0"):
        ServerSettings(token="t", max_sessions=0)
    ServerSettings(insecure=True)


# -- the real model ------------------------------------------------------------------------------------------------
def test_real_model_split_and_measured_profile(reference, model):
    """SmolLM2-135M split at layer 15: bit-identical logits; the start-up profile is real and short."""
    t0 = time.perf_counter()
    app = create_app(reference, "smollm2", "0" * 64, ServerSettings(token=TOKEN))
    startup_s = time.perf_counter() - t0
    n = model.config.n_layers
    server = LiveServer(app)
    try:
        with CloudClient(server.url, TOKEN) as c:
            profile = c.capabilities()["profile"]
            assert len(profile["layer_ms_decode"]) == len(profile["layer_ms_prefill_per_token"]) == n
            assert all(ms > 0 for ms in profile["layer_ms_decode"][:-1]) and profile["head_ms"] > 0
            assert startup_s < 10, f"profiling took {startup_s:.1f} s (target < 2 s on an idle machine)"
            local = reference.open_session(max_tokens=32)
            device = reference.open_session(LayerRange(0, 15, n), 32)
            remote = c.open_session(15, 32)
            ids = np.array([1, 504, 3458, 282, 4649, 314, 1345, 30], dtype=np.int64)
            for _ in range(4):
                expected = local.forward(ids)
                np.testing.assert_array_equal(remote.forward(device.forward(ids)), expected)
                ids = np.array([int(np.argmax(expected))])
    finally:
        server.stop()


# -- fuzzing the published API (schemathesis) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_target(tiny) -> Iterator[tuple[LiveServer, object]]:
    """A fresh server (fuzzing fills sessions) and its schema as schemathesis reads it; drain is left out
    because it is meant to stop the server taking work (its test is test_drain_...)."""
    import schemathesis

    schemathesis.serializer.alias(wire.CONTENT_TYPE, "application/octet-stream")  # send generated bytes as-is
    with serve(tiny, max_sessions=8, max_request_bytes=64 * 1024) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        # An invalid body over max_request_bytes is refused with 413 before it is parsed (documented in the
        # OpenAPI); schemathesis' default list of rejection statuses lacks 413, so a large negative case
        # failed at random (hypothesis seed 323654838498847518510950459776077950879 reproduces it).
        rejection = schema.config.checks.negative_data_rejection
        rejection.expected_statuses = [*rejection.expected_statuses, "413"]

        @schema.auth()
        class Bearer:  # schemathesis leaves it off where a case tests a missing/invalid Authorization
            def get(self, case, context) -> str:
                return TOKEN

            def set(self, case, data, context) -> None:
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

        yield server, schema.exclude(operation_id="drain")


class StatusLog:
    """What the server answered, per (operation, status); `check` is the schemathesis check that fills it
    and fails on any 5xx but the documented 503/507."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], int] = {}

        def no_server_error(ctx, response, case) -> None:
            key = (case.operation.label, response.status_code)
            self.seen[key] = self.seen.get(key, 0) + 1
            assert response.status_code < 500 or response.status_code in (503, 507), \
                f"{case.operation.label} answered {response.status_code}: {response.text[:300]}"

        self.check = no_server_error


def _checks(log: StatusLog) -> dict:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    # Replaced: not_a_server_error (it counts the documented 503/507 as bugs) by StatusLog;
    # dropped: positive_data_acceptance (a schema-valid *binary* body is still an invalid tensor -> 400).
    # Kept: status_code_conformance (every answer documented), content type, headers, response schemas, ...
    return {"excluded_checks": [not_a_server_error, positive_data_acceptance], "additional_checks": [log.check]}


def test_fuzz_every_operation_positive_and_negative(fuzz_target):
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    server, schema = fuzz_target
    log = StatusLog()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(mode, auth_storage=schema.auth))
            @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                      derandomize=True)  # the same cases every run: CI failures reproduce
            def run(case) -> None:
                case.call_and_validate(**_checks(log))

            try:
                run()
            except Unsatisfiable:  # an operation without parameters has nothing to get wrong
                assert mode == GenerationMode.NEGATIVE and operation.label == "GET /v1/health"
    statuses = {status for _, status in log.seen}
    assert {200, 401, 404, 422} <= statuses, log.seen  # it reached auth, routing and validation
    assert all(s < 500 or s in (503, 507) for s in statuses)


def test_fuzz_stateful_follows_links_into_live_sessions(fuzz_target, tiny):
    """Scenarios create sessions (with the right checksum) and follow the OpenAPI links into them."""
    from hypothesis import HealthCheck, settings
    from schemathesis.specs.openapi.checks import negative_data_rejection

    server, schema = fuzz_target
    log = StatusLog()
    injected: set[int] = set()

    class Workflow(schema.as_state_machine()):
        def before_call(self, case) -> None:
            positive = case.meta.generation.mode.is_positive
            if case.operation.label == "POST /v1/sessions" and positive and isinstance(case.body, dict) and \
                    isinstance(case.body.get("model_sha256"), str):
                case.body["model_sha256"] = tiny.sha256  # else every create is a 409 and no link is followed
                injected.add(id(case))
            live_session = server.app.state.service.store._sessions.get((case.path_parameters or {}).get("session_id"))
            if case.operation.label.endswith("/forward") and positive and live_session:
                # some real steps, not only garbage: token ids or hidden states, whichever this session takes
                case.body = wire.encode_tensor(np.array([1, 2], np.int32) if live_session.start == 0
                                               else np.ones((2, 64), np.float32))
                injected.add(id(case))

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            checks = _checks(log)
            if id(case) in injected:  # schemathesis re-derives the mode of an edited case; ours is valid data
                checks["excluded_checks"].append(negative_data_rejection)
            case.validate_response(response, transport_kwargs=kwargs, **checks)

        def teardown(self) -> None:  # do not let sessions pile up to max_sessions across scenarios
            for entry in list(server.app.state.service.store._sessions.values()):
                server.app.state.service.delete(entry.id)

    # derandomized: a random draw of 15 scenarios once never reached a successful forward (seen 2026-11-27)
    Workflow.run(settings=settings(max_examples=15, stateful_step_count=6, deadline=None, database=None,
                                   suppress_health_check=list(HealthCheck), derandomize=True))
    assert log.seen.get(("POST /v1/sessions", 201)), log.seen
    assert log.seen.get(("POST /v1/sessions/{session_id}/forward", 200)), log.seen  # real steps through links
