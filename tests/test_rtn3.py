"""3-bit (and every group-wise) round-to-nearest plan format: packing, numerics against a numpy oracle,
true packed size, the reference path through stored blocks, and the ONNX exporter's refusal."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.compress.plan import QUANT_FORMATS, CompressionPlan
from edgellm.errors import ConfigError
from edgellm.export.block_formats import pack, quantize_format, unpack

THREE_BIT = [f for f, spec in QUANT_FORMATS.items() if spec.bits == 3]


def _oracle_pack3(q: np.ndarray) -> np.ndarray:
    """Bit by bit with Python ints: element i occupies bits 3i..3i+2 of a little-endian byte stream."""
    rows = []
    for row in q.reshape(-1, q.shape[-1]):
        stream = sum(int(v) << (3 * i) for i, v in enumerate(row))
        rows.append([(stream >> (8 * b)) & 0xFF for b in range(len(row) * 3 // 8)])
    return np.array(rows, dtype=np.uint8).reshape(*q.shape[:-1], -1)


def test_three_bit_pack_matches_a_bitwise_oracle_and_round_trips():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 8, size=(3, 5, 32))
    packed = pack(q, 3)
    assert packed.shape == (3, 5, 12)  # 32 values x 3 bits = 12 bytes per block
    np.testing.assert_array_equal(packed, _oracle_pack3(q))
    np.testing.assert_array_equal(unpack(packed, 3), q)
    with pytest.raises(ConfigError, match="multiple of 8"):
        pack(q[..., :12], 3)


def _oracle_rtn(w: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Textbook group-wise RTN in float64: symmetric levels -(2^(b-1)-1)..2^(b-1)-1 times amax/(2^(b-1)-1);
    asymmetric 0..2^b-1 levels from the group minimum with step (max-min)/(2^b-1); step and minimum
    rounded to the nearest fp16 value (what a file stores, as in GGUF)."""
    n, k = w.shape
    g = w.reshape(n, k // group, group).astype(np.float64)
    if symmetric:
        half = 2 ** (bits - 1) - 1
        step = np.abs(g).max(-1, keepdims=True) / half
        step[step == 0] = 1.0
        step = step.astype(np.float16).astype(np.float64)
        out = np.clip(np.round(g / step), -half, half) * step
    else:
        lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        lo = lo.astype(np.float16).astype(np.float64)
        step = (hi - lo) / (2**bits - 1)
        step[step == 0] = 1.0
        step = step.astype(np.float16).astype(np.float64)
        out = np.clip(np.round((g - lo) / step), 0, 2**bits - 1) * step + lo
    return out.reshape(n, k)


@pytest.mark.parametrize("fmt", THREE_BIT)
def test_three_bit_rtn_matches_the_numpy_oracle(fmt: str):
    spec = QUANT_FORMATS[fmt]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 256)).astype(np.float32) * rng.uniform(0.01, 2, size=(16, 1)).astype(np.float32)
    bq = quantize_format(w, fmt)
    deq = bq.dequantize()
    oracle = _oracle_rtn(w, 3, spec.group, spec.symmetric)
    step = np.abs(w).max() / 3 if spec.symmetric else (w.max() - w.min()) / 7
    diff = np.abs(deq - oracle)
    # float32 vs float64 rounding can flip a value sitting on a rounding boundary by one step; nothing else
    assert np.mean(diff > 1e-5) < 1e-3, f"{fmt}: {np.mean(diff > 1e-5):.2%} differ, max {diff.max():.3g}"
    assert diff.max() <= step * 1.001
    err = np.abs(deq - w).reshape(16, -1, spec.group)
    half_step = (np.abs(w).reshape(16, -1, spec.group).max(-1) / 3 if spec.symmetric else
                 np.ptp(w.reshape(16, -1, spec.group), axis=-1) / 7) / 2
    # fp16 step/minimum: a value at the group's edge may sit up to ~levels * 2^-11 steps beyond half a step
    assert (err.max(-1) <= half_step * (1 + 2e-2) + 1e-7).all(), f"{fmt}: an error exceeds half a step"
    assert len(np.unique(unpack(bq.packed, 3))) <= 8
    # true stored size: 3 bits per weight + fp16 scales (+ fp16 minima when asymmetric) per group
    groups = w.size // spec.group
    assert bq.stored_nbytes == spec.nbytes(256, 16) == w.size * 3 // 8 + groups * (2 if spec.symmetric else 4)


def test_onnx_runtime_refuses_three_bit_matmulnbits():
    """The fact the 3-bit design rests on: if ONNX Runtime starts accepting bits=3, export it instead."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=32, N=8, bits=3,
                            block_size=32, accuracy_level=4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.zeros((8, 1, 12), np.uint8), "w"), numpy_helper.from_array(np.ones(8, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    ort.set_default_logger_severity(4)
    with pytest.raises(Exception, match="Only 2b, 4b and 8b"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgellm.model.loader import load_model
    from tests.tiny_gguf import write_tiny_gguf

    return load_model(write_tiny_gguf(tmp_path_factory.mktemp("rtn3") / "t.gguf", hidden=128, ffn=256, qtype="Q4_1"))


def test_three_bit_plan_runs_on_the_reference_and_export_refuses_it(tiny, tmp_path):
    from edgellm.compress.rtn import check_onnx_exportable, linear_bytes, materialize
    from edgellm.export.onnx_export import effective_description, export_onnx
    from edgellm.runtime.registry import create_backend

    plan = CompressionPlan(default="int3-sym-g128", overrides={"blk.1.ffn_down": "int3"}, name="int3-mix")
    model, kept = materialize(tiny, plan)
    eff = effective_description(model, kept)
    w = tiny.weights.float("blk.0.attn_q.weight")
    np.testing.assert_array_equal(eff.weights.float("blk.0.attn_q.weight"),
                                  quantize_format(w, "int3-sym-g128").dequantize())
    np.testing.assert_array_equal(eff.weights.float("blk.1.ffn_down.weight"),
                                  quantize_format(tiny.weights.float("blk.1.ffn_down.weight"), "int3").dequantize())
    logits = create_backend("reference", eff).open_session(max_tokens=8).forward(np.arange(8), all_logits=True)
    assert np.isfinite(logits).all()
    size, count = linear_bytes(tiny, plan)
    assert size == linear_bytes(model, kept)[0]  # stored blocks cost what the format says
    assert 3.0 < size * 8 / count < 3.5
    for description, p in ((tiny, plan), (model, kept)):
        with pytest.raises(ConfigError, match="cannot be exported to ONNX.*blk.0.attn_q.*2, 4, 8-bit"):
            check_onnx_exportable(description, p)
    with pytest.raises(ConfigError, match="int3-sym-g128"):  # the exporter itself refuses the format by name
        export_onnx(tiny, tmp_path / "x", plan)


def test_group_128_plan_exports_through_stored_blocks(tiny, tmp_path):
    """Groups of 64/128 at 2/4 bits run on ONNX Runtime once materialized; the export computes what the
    reference computes with the same blocks (int8 activations off: exact fp32 path)."""
    from edgellm.compress.rtn import check_onnx_exportable, materialize
    from edgellm.export.onnx_export import effective_description, export_onnx
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    plan = CompressionPlan(default="int4-sym-g128", overrides={"blk.0.ffn_*": "int2-g64"}, lm_head="fp32",
                           accuracy_level=0, lm_head_accuracy_level=0, name="g128")
    model, kept = materialize(tiny, plan)
    check_onnx_exportable(model, kept)
    art = export_onnx(model, tmp_path / "onnx", kept)
    ids = np.arange(3, 19)
    ort_logits = create_backend("onnxruntime", load_model(art)).open_session(max_tokens=16).forward(ids, all_logits=True)
    ref_logits = create_backend("reference", effective_description(model, kept)).open_session(max_tokens=16).forward(
        ids, all_logits=True)
    np.testing.assert_allclose(ort_logits, ref_logits, atol=2e-3, rtol=1e-3)


def test_gptq_three_bit_beats_rtn_on_correlated_inputs_and_shares_its_layout():
    """GPTQ at 3 bits (the layout quantize_rtn writes, so materialize/reference/refusal all apply)."""
    from edgellm.compress.gptq import gptq_quantize
    from edgellm.export.block_formats import quantize_rtn

    rng = np.random.default_rng(4)
    mix = rng.standard_normal((64, 64)).astype(np.float32)
    x = rng.standard_normal((512, 64)).astype(np.float32) @ mix  # correlated inputs: where GPTQ helps
    w = rng.standard_normal((32, 64)).astype(np.float32)
    for symmetric in (False, True):
        gptq = gptq_quantize(w, x, 3, 32, symmetric)
        rtn = quantize_rtn(w, 3, 32, symmetric)
        assert (gptq.bits, gptq.block_size, gptq.zero_point, gptq.packed.shape) == (3, 32, 4, rtn.packed.shape)
        err_g = np.linalg.norm(x @ (w - gptq.dequantize()).T)
        err_r = np.linalg.norm(x @ (w - rtn.dequantize()).T)
        assert err_g < 0.9 * err_r, f"symmetric={symmetric}: GPTQ output error {err_g:.3g} vs RTN {err_r:.3g}"
