"""Offloaded generation against a real uvicorn server on 127.0.0.1 behind the shaping proxy.

Oracle: edgellm.runtime.generation.generate on an all-local reference session. Every run (static splits,
adaptive, every kind of KV move, faults: killed, 503-draining, stalled, failover to a second server)
must give the same greedy tokens. The device is the same reference backend slowed 8x (emulation.py), so
the cloud is worth using and the planner has real choices to make.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgellm.model.loader import load_model
from edgellm.model.tokenizer import Tokenizer
from edgellm.offload.device import DeviceStack, ReplayLog, replay_kv
from edgellm.offload.emulation import EmulatedBackend
from edgellm.offload.generate import OffloadConfig, OffloadedGenerator
from edgellm.offload.identity import model_sha256
from edgellm.offload.planner import Decision, MoveCost, Planner
from edgellm.offload.profile import LayerProfile, measure_layer_profile
from edgellm.offload.server import ServerSettings, create_app
from edgellm.offload.shaping_proxy import ShapingProxy
from edgellm.runtime.backend import Backend
from edgellm.runtime.generation import GenerationConfig
from edgellm.runtime.generation import generate as local_generate
from edgellm.runtime.reference import ReferenceBackend
from edgellm.runtime.sampling import SamplingConfig
from tests.live_server import LiveServer
from tests.tiny_gguf import write_tiny_gguf

TOKEN = "offload-test-token"
N_LAYERS = 4
N_NEW = 24
GREEDY = GenerationConfig(max_new_tokens=N_NEW, sampling=SamplingConfig(greedy=True), stop_at_eos=False)
SLOWDOWN = 8.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: device and server share this process and two loaded cores, where a 2-thread
    OpenMP barrier waits for a descheduled worker (measured: 0.3 ms tiny-model layers became 12-20 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Tiny:
    backend: Backend  # the server's (full speed)
    device: Backend  # the device's (slowed)
    profile: LayerProfile  # the device's, measured
    tokenizer: Tokenizer
    sha256: str
    path: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread) -> Tiny:
    path = write_tiny_gguf(tmp_path_factory.mktemp("offload-gen") / "tiny.gguf", n_layers=N_LAYERS, hidden=64,
                           vocab=300, seed=3)
    description = load_model(path)
    backend = ReferenceBackend.from_model(description)
    device = EmulatedBackend.slowed(ReferenceBackend.from_model(description), SLOWDOWN, prefill_tokens=8,
                                    decode_context=8, repeats=5)
    return Tiny(backend, device, measure_layer_profile(device, prefill_tokens=8, decode_context=8, repeats=3),
                Tokenizer(description.tokenizer), model_sha256(description), path)


@contextlib.contextmanager
def server(tiny: Tiny, proxy: dict | None = None) -> Iterator[tuple[LiveServer, ShapingProxy]]:
    live = LiveServer(create_app(tiny.backend, "tiny", tiny.sha256,
                                 ServerSettings(token=TOKEN, profile=True, sweep_interval_s=60)))
    try:
        with ShapingProxy("127.0.0.1", live.port, **(proxy or {})) as shaped:
            yield live, shaped
    finally:
        live.kill()


PROMPT = [int(t) for t in np.random.default_rng(7).integers(0, 300, 10)]


@pytest.fixture(scope="module")
def expected(tiny) -> list[int]:
    session = tiny.backend.open_session(max_tokens=len(PROMPT) + N_NEW)
    tokens = [e.token_id for e in local_generate(session, tiny.tokenizer, PROMPT, GREEDY)]
    assert len(set(tokens)) > 3, f"the oracle should not be trivially repetitive: {tokens}"
    return tokens


def generator(tiny: Tiny, urls: list[str], **config) -> OffloadedGenerator:
    config = {"probe_interval_s": 0.1, "timeout_s": 2.0, "retry_after_s": 0.2, **config}
    return OffloadedGenerator(tiny.device, urls, TOKEN, model_sha256=tiny.sha256, config=OffloadConfig(**config),
                              device_profile=tiny.profile)


def run(gen: OffloadedGenerator, tiny: Tiny, on_token=None, config: GenerationConfig = GREEDY) -> list[int]:
    tokens = []
    for i, event in enumerate(gen.generate(tiny.tokenizer, PROMPT, config)):
        tokens.append(event.token_id)
        if on_token is not None:
            on_token(i)
    return tokens


@pytest.fixture(scope="module")
def shared(tiny) -> Iterator[tuple[LiveServer, ShapingProxy]]:
    with server(tiny) as pair:
        yield pair


@pytest.mark.parametrize("split", [0, 1, 3, N_LAYERS, None])
def test_static_splits_and_adaptive_equal_all_local(tiny, expected, shared, split):
    with generator(tiny, [shared[1].url], static_split=split) as gen:
        assert run(gen, tiny) == expected
        splits = {r.split for r in gen.last_records}
    if split is not None:
        assert splits == {split}
    else:
        assert splits != {N_LAYERS}, "an 8x slower device should offload on loopback"


def test_sampled_tokens_with_logits_on_the_wire_equal_all_local(tiny, shared):
    sampled = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=0.9, seed=5), stop_at_eos=False)
    session = tiny.backend.open_session(max_tokens=len(PROMPT) + 12)
    want = [e.token_id for e in local_generate(session, tiny.tokenizer, PROMPT, sampled)]
    with generator(tiny, [shared[1].url], static_split=2) as gen:
        assert run(gen, tiny, config=sampled) == want
        assert all(r.bytes_received > 4 * 300 for r in gen.last_records)  # logits came back, not token ids


class ScriptedPlanner(Planner):
    """Moves through a fixed list of (split, method) to exercise every kind of KV move."""

    def __init__(self, base: Planner, script: list[tuple[int, str]]) -> None:
        super().__init__(base.model, base.config)
        self.script = list(script)

    def step(self, net, current, history, remaining_tokens, cloud=True, device_replay_from=0) -> Decision:
        split, method = self.script.pop(0) if self.script else (current, "none")
        return Decision(split, MoveCost(method, 0.0, 0.0) if split != current else MoveCost("none", 0, 0))


def test_every_kv_move_keeps_tokens_identical(tiny, expected, shared):
    script = [(2, "none"), (0, "upload"), (0, "none"), (3, "download"), (1, "upload"), (N_LAYERS, "device-recompute"),
              (N_LAYERS, "none"), (2, "server-replay"), (N_LAYERS, "download"), (0, "server-replay"),
              (3, "device-recompute"), (N_LAYERS, "device-recompute")]
    with generator(tiny, [shared[1].url], static_split=None) as gen:
        ep = gen.active_endpoint()
        gen._planners[ep.url] = ScriptedPlanner(gen.planner(ep), script)
        assert run(gen, tiny) == expected
        moves = [r.move for r in gen.last_records if r.move]
    methods = {m.split()[1] for m in moves}
    assert methods == {"upload", "download", "device-recompute", "server-replay"}, moves
    assert not any(r.fault for r in gen.last_records)


def test_adaptive_leaves_the_cloud_when_rtt_rises_and_keeps_tokens(tiny, expected):
    with server(tiny) as (_, proxy), generator(tiny, [proxy.url]) as gen:
        rise_at = 6
        tokens = run(gen, tiny, on_token=lambda i: i == rise_at and proxy.set(delay_ms=60.0))
        splits = [r.split for r in gen.last_records]
    assert tokens == expected
    assert splits[rise_at] < N_LAYERS, splits
    settled = next(i for i in range(rise_at, len(splits)) if all(s == N_LAYERS for s in splits[i:]))
    assert settled - rise_at <= 5, f"took {settled - rise_at} tokens to go local after the RTT rise: {splits}"


def test_server_killed_mid_generation(tiny, expected):
    with server(tiny) as (live, proxy), generator(tiny, [proxy.url], static_split=1) as gen:
        tokens = run(gen, tiny, on_token=lambda i: i == 5 and live.kill())
        records = gen.last_records
    assert tokens == expected
    faults = [r for r in records if r.fault]
    assert len(faults) == 1 and records.index(faults[0]) == 6, [r.fault for r in records]
    assert all(r.split == N_LAYERS for r in records[6:])


def test_drained_503_then_vanishing_server(tiny, expected):
    with server(tiny) as (live, proxy), generator(tiny, [proxy.url], static_split=0) as gen:
        def preempt(i: int) -> None:
            if i == 4:
                httpx.post(f"{live.url}/v1/admin/drain", headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
            if i == 8:
                live.kill()

        tokens = run(gen, tiny, on_token=preempt)
        records = gen.last_records
    assert tokens == expected
    assert [i for i, r in enumerate(records) if r.fault] == [5]
    assert "CloudUnavailableError" in records[5].fault


def test_stall_beyond_the_timeout_falls_back_locally(tiny, expected):
    with server(tiny) as (_, proxy), generator(tiny, [proxy.url], static_split=2, timeout_s=0.5) as gen:
        tokens = run(gen, tiny, on_token=lambda i: i == 3 and proxy.stall())
        records = gen.last_records
        proxy.resume()
    assert tokens == expected
    stalled = records[4]
    assert stalled.fault and stalled.latency_ms >= 500, stalled
    assert all(r.split == N_LAYERS for r in records[4:9])  # the stalled server is not retried at once


def test_failover_to_a_second_server(tiny, expected):
    # A static split: whether the adaptive planner *should* move back to a server after a fault depends on
    # measured costs (on a loaded CI machine it may rightly stay local); here the failover itself is tested.
    with server(tiny) as (first, p1), server(tiny) as (_, p2), \
            generator(tiny, [p1.url, p2.url], static_split=0) as gen:
        tokens = run(gen, tiny, on_token=lambda i: i == 5 and first.kill())
        records = gen.last_records
    assert tokens == expected
    assert records[0].endpoint == p1.url and any(r.fault for r in records)
    after = [r.endpoint for r in records[8:]]
    assert p2.url in after, f"never moved to the second server: {[(r.split, r.endpoint) for r in records]}"


def test_unreachable_server_at_start_runs_locally(tiny, expected):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
        with generator(tiny, [dead]) as gen:
            assert run(gen, tiny) == expected
            assert {r.split for r in gen.last_records} == {N_LAYERS}


def test_device_replay_rebuilds_kv_bit_for_bit(tiny):
    """Replaying the original chunks gives the very KV incremental decoding made (a batch would not)."""
    backend = tiny.backend
    stack = DeviceStack(backend, 32)
    stack.reset(N_LAYERS)
    log = ReplayLog()
    for chunk in (np.array(PROMPT), np.array([5]), np.array([9]), np.array([11])):
        stack.forward(chunk)
        log.append(chunk, N_LAYERS, None)
    rebuilt = replay_kv(backend, log, 1, N_LAYERS)
    original = stack.export_kv(1, N_LAYERS)
    for layer, (k, v) in original.items():
        assert np.array_equal(k, rebuilt[layer][0]) and np.array_equal(v, rebuilt[layer][1]), f"layer {layer}"
    stack.recut(2)
    stack.recut(N_LAYERS, None, log)  # layers 2, 3 recomputed by replay, 0, 1 copied
    for layer, (k, v) in stack.export_kv(0, N_LAYERS).items():
        assert np.array_equal(k, original.get(layer, (k, v))[0]) and np.array_equal(v, original.get(layer, (k, v))[1])


def test_offloaded_generation_needs_a_layer_range_backend_and_valid_split(tiny):
    from edgellm.errors import ConfigError

    with pytest.raises(ConfigError, match="outside 0..4"):
        OffloadedGenerator(tiny.device, ["http://127.0.0.1:9"], TOKEN, config=OffloadConfig(static_split=5),
                           device_profile=tiny.profile)
    with pytest.raises(ConfigError, match="at least one server"):
        OffloadedGenerator(tiny.device, [], TOKEN, device_profile=tiny.profile)


@pytest.mark.slow
def test_real_model_adaptive_with_a_fault_equals_all_local(model, tokenizer, reference):
    """SmolLM2-135M end to end: adaptive offload, the link cut mid-generation, identical greedy tokens."""
    prompt = tokenizer.encode("The capital of France is")
    config = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(greedy=True), stop_at_eos=False)
    want = [e.token_id for e in local_generate(reference.open_session(max_tokens=64), tokenizer, prompt, config)]
    sha = model_sha256(model)
    device = EmulatedBackend.slowed(reference, 3.0, prefill_tokens=8, decode_context=8, repeats=3)
    profile = measure_layer_profile(device, prefill_tokens=8, decode_context=8, repeats=2)
    app = create_app(reference, "smollm2", sha, ServerSettings(token=TOKEN, profile=True))
    live = LiveServer(app)
    try:
        with ShapingProxy("127.0.0.1", live.port) as proxy:
            gen = OffloadedGenerator(device, [proxy.url], TOKEN, model_sha256=sha, device_profile=profile,
                                     config=OffloadConfig(static_split=20, timeout_s=5.0, probe_interval_s=0.2))

            def cut(i: int) -> None:
                if i == 4:
                    proxy.refuse_connections()
                    proxy.drop_connections()

            with gen:
                got = []
                for i, event in enumerate(gen.generate(tokenizer, prompt, config)):
                    got.append(event.token_id)
                    cut(i)
                records = gen.last_records
    finally:
        live.kill()
    assert got == want
    assert records[0].split == 20 and any(r.fault for r in records) and records[-1].split == model.config.n_layers


def test_cli_offload_arguments_generate_identical_tokens(tiny, expected, shared, monkeypatch, tmp_path):
    import argparse

    from edgellm.cli.offload_command import add_offload_args, generate_offloaded

    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default=None)
    parser.add_argument("--threads", type=int, default=None)
    add_offload_args(parser)
    args = parser.parse_args(["--offload", shared[1].url, "--offload-split", "2", "--objective", "energy"])
    monkeypatch.setenv("EDGELLM_TOKEN", TOKEN)
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))  # the device profile is measured and cached here
    description = load_model(tiny.path)
    events = list(generate_offloaded(args, description, tiny.tokenizer, PROMPT, GREEDY))
    assert [e.token_id for e in events] == expected
    assert list(tmp_path.rglob("*.json")), "the device profile was not cached"
    with pytest.raises(SystemExit):
        parser.parse_args(["--offload-split", "-1"])


@pytest.fixture(scope="module")
def ort_device(tiny, tmp_path_factory) -> Tiny:
    """The same tiny model exported to ONNX (fp32 activations) as the device: ONNX Runtime runs the device's
    layer ranges (in-memory cuts of the export) and the reference backend the server's."""
    from edgellm.compress.plan import PRESETS
    from edgellm.export.onnx_export import export_onnx
    from edgellm.runtime.registry import create_backend

    art = export_onnx(load_model(tiny.path), tmp_path_factory.mktemp("offload-ort") / "onnx", PRESETS["lossless-exact"])
    device = create_backend("onnxruntime", load_model(art), threads=1)
    assert device.supports_layer_ranges
    return Tiny(tiny.backend, device, measure_layer_profile(device, prefill_tokens=8, decode_context=8, repeats=3),
                tiny.tokenizer, tiny.sha256, tiny.path)


def test_onnx_runtime_device_splits_and_moves_kv_with_the_reference_server(ort_device, expected, shared):
    """Every KV move between an ONNX Runtime device and the server keeps the greedy tokens of the all-local
    reference (fp32 on both sides; the tiny model's logits differ by ~1e-6, far from any argmax tie)."""
    script = [(2, "none"), (0, "upload"), (3, "download"), (N_LAYERS, "device-recompute"), (1, "server-replay"),
              (N_LAYERS, "download"), (2, "device-recompute")]
    with generator(ort_device, [shared[1].url], static_split=None) as gen:
        ep = gen.active_endpoint()
        gen._planners[ep.url] = ScriptedPlanner(gen.planner(ep), script)
        assert run(gen, ort_device) == expected
        moves = {m.split()[1] for m in (r.move for r in gen.last_records) if m}
    assert moves == {"upload", "download", "device-recompute", "server-replay"}, moves
    for split in (1, 3):
        with generator(ort_device, [shared[1].url], static_split=split) as gen:
            assert run(gen, ort_device) == expected
