"""Layer-range sessions on ONNX Runtime (graph cuts of the export) against the whole graph and torch.

A chain of cuts reproduces the whole graph bit for bit, for fp32 and for int8 activations (a cut enters
through the same fused skip-norm kernel, on (hidden, 0)). Against the torch reference (an independent
oracle) the fp32-activation export agrees to 1e-3 in logits (observed ~1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.compress.plan import PRESETS
from edgellm.errors import ConfigError
from edgellm.export.onnx_export import effective_description, export_onnx
from edgellm.model.loader import load_model
from edgellm.runtime.backend import LayerRange
from edgellm.runtime.registry import create_backend

ATOL = 1e-3
IDS = np.arange(300, 332)
STEPS = (11, 12, 13)


@pytest.fixture(scope="module")
def exact(model, tmp_path_factory):
    plan = PRESETS["lossless-exact"]
    path = export_onnx(model, tmp_path_factory.mktemp("ranges") / "exact", plan)
    ort_backend = create_backend("onnxruntime", load_model(path), threads=2)
    torch_backend = create_backend("reference", effective_description(model, plan))
    return ort_backend, torch_backend


def run_chain(sessions, ids, steps):
    def step(x, all_logits=False):
        for s in sessions[:-1]:
            x = s.forward(x)
        return sessions[-1].forward(x, all_logits=all_logits)
    return step(ids, all_logits=True), [step(np.array([t])) for t in steps]


@pytest.fixture(scope="module")
def fast(model, tmp_path_factory):
    path = export_onnx(model, tmp_path_factory.mktemp("ranges") / "fast", PRESETS["lossless-transcode"])
    return create_backend("onnxruntime", load_model(path), threads=2)


@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("cuts", [(1,), (15,), (29,), (10, 20)])
def test_chained_ranges_equal_the_whole_graph_bit_for_bit(exact, fast, cuts, activations):
    ort_backend = exact[0] if activations == "fp32" else fast
    n = ort_backend.config.n_layers
    bounds = (0, *cuts, n)
    sessions = [ort_backend.open_session(LayerRange(a, b, n), max_tokens=64) for a, b in zip(bounds, bounds[1:], strict=False)]
    prefill, decode = run_chain(sessions, IDS, STEPS)
    ref_prefill, ref_decode = run_chain([ort_backend.open_session(max_tokens=64)], IDS, STEPS)
    np.testing.assert_array_equal(prefill, ref_prefill)
    for got, want in zip(decode, ref_decode, strict=True):
        np.testing.assert_array_equal(got, want)


def test_range_equals_torch_reference_on_the_same_hidden_states(exact):
    ort_backend, torch_backend = exact
    n = ort_backend.config.n_layers
    hidden = torch_backend.open_session(LayerRange(0, 12, n), max_tokens=64).forward(IDS)
    mid_ort = ort_backend.open_session(LayerRange(12, 20, n), max_tokens=64).forward(hidden)
    mid_torch = torch_backend.open_session(LayerRange(12, 20, n), max_tokens=64).forward(hidden)
    np.testing.assert_allclose(mid_ort, mid_torch, atol=ATOL * np.abs(mid_torch).max(), rtol=0)
    tail_ort = ort_backend.open_session(LayerRange(20, n, n), max_tokens=64).forward(mid_torch, all_logits=True)
    tail_torch = torch_backend.open_session(LayerRange(20, n, n), max_tokens=64).forward(mid_torch, all_logits=True)
    np.testing.assert_allclose(tail_ort, tail_torch, atol=ATOL, rtol=0)


@pytest.mark.parametrize("engine", ["onnxruntime", "reference"])
def test_kv_moves_between_sessions(exact, engine):
    """A cache exported from one session and imported by another continues the sequence bit for bit."""
    ort_backend, torch_backend = exact
    backend = ort_backend if engine == "onnxruntime" else torch_backend
    n = backend.config.n_layers
    head = backend.open_session(LayerRange(0, 8, n), max_tokens=64)
    first = backend.open_session(LayerRange(8, n, n), max_tokens=64)
    first.forward(head.forward(IDS))
    moved = backend.open_session(LayerRange(8, n, n), max_tokens=64)
    moved.import_kv(first.export_kv(), first.position)
    assert moved.position == len(IDS)
    x = head.forward(np.array([STEPS[0]]))
    np.testing.assert_array_equal(moved.forward(x), first.forward(x))


def test_kv_caches_agree_across_engines(exact):
    """The cache ONNX Runtime's GroupQueryAttention writes (rotated keys) equals torch's."""
    ort_backend, torch_backend = exact
    n = ort_backend.config.n_layers
    caches = []
    for backend in (ort_backend, torch_backend):
        s = backend.open_session(LayerRange(0, 8, n), max_tokens=64)
        s.forward(IDS)
        caches.append(s.export_kv(0, 8))
    for layer in (0, 7):
        for got, want in zip(caches[0][layer], caches[1][layer], strict=True):
            assert got.shape == (len(IDS), ort_backend.config.n_kv_heads, ort_backend.config.head_dim)
            np.testing.assert_allclose(got, want, atol=ATOL * max(1.0, float(np.abs(want).max())), rtol=0)


def test_range_errors_are_clear(exact):
    ort_backend, _ = exact
    n = ort_backend.config.n_layers
    s = ort_backend.open_session(LayerRange(5, 9, n), max_tokens=16)
    with pytest.raises(ConfigError, match="hidden states must be"):
        s.forward(np.zeros((2, 7), np.float32))
    with pytest.raises(ConfigError, match="not in this session's range"):
        s.read_kv(12)
    with pytest.raises(ConfigError, match="needs every layer"):
        s.import_kv({5: (np.zeros((1, 3, 64), np.float32),) * 2}, 1)
    with pytest.raises(ConfigError, match="cannot cut layers"):
        ort_backend.open_session(LayerRange(4, 4, n), max_tokens=16)


def test_an_export_from_before_the_token_rows_is_refused_with_re_export(exact):
    """Exports written before the 2-D token rows have no seq_shape tensor: a cut says re-export."""
    import onnx

    from edgellm.errors import ModelFormatError
    from edgellm.runtime.onnx_range import cut_layers

    ort_backend, _ = exact
    cfg = ort_backend.config
    old = onnx.load(str(ort_backend.directory / "model.onnx"), load_external_data=False)
    keep = [n for n in old.graph.node if "seq_shape" not in n.output]
    del old.graph.node[:]
    old.graph.node.extend(keep)
    with pytest.raises(ModelFormatError, match="re-export"):
        cut_layers(old, 3, 7, cfg.n_layers, cfg.hidden_size)
