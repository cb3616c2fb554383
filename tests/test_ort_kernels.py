"""edgellm's BlockMatMul / BlockGather kernels against independent oracles.

- Layout: the x8 interleave read back row by row equals gguf-py's own dequantization of the blocks.
- Arithmetic: numpy emulating the int8 activation quantization (per block of 32: d = amax/127,
  q = round-half-even(x/d)) times the gguf-py weights in float64: relative error < 1e-5 (only the
  float accumulation order differs); against the exact float product: within the int8 activation error.
- Every ISA path built here (AVX-512 VNNI or native, AVX2, plain C) gives the same results.
- Inside ONNX Runtime (1 and 2 threads) the op equals the single-threaded library call bit for bit.
- Bad ids, shapes and attributes are clear errors.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgellm.errors import ConfigError
from edgellm.export.block_formats import GGUF_BLOCK_BYTES, interleave_x8, quantize_rtn, with_gguf_blocks
from edgellm.runtime import ort_kernels
from tests.block_oracles import EMULATION_RTOL, emulated, gguf_blocks, gguf_float

FORMATS = ["Q4_0", "Q4_1", "Q8_0"]


def libraries() -> list[ort_kernels.KernelLibrary]:
    libs = [ort_kernels.build()]
    if platform.machine() in ("x86_64", "AMD64"):
        libs.append(ort_kernels.build("x86-64"))  # no AVX2: the plain C path
        flags = open("/proc/cpuinfo").read()
        if " avx2 " in flags and " f16c " in flags and " fma " in flags:
            libs.append(ort_kernels.build("haswell"))  # AVX2 without VNNI
    return libs


try:
    LIBRARIES = libraries()
except ort_kernels.KernelBuildError as exc:  # no C++ compiler: the stock-op lowering still works
    pytest.skip(f"edgellm's kernels cannot be built here: {exc}", allow_module_level=True)


@pytest.fixture(scope="module", params=LIBRARIES, ids=lambda lib: lib.isa)
def library(request):
    return request.param


def test_the_x86_builds_take_the_paths_they_claim():
    if platform.machine() != "x86_64":
        pytest.skip("x86 only")
    assert ort_kernels.build("x86-64").isa == "scalar"
    assert ort_kernels.build("haswell").isa == "avx2"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [8, 45])  # 45: a zero-padded last group
def test_x8_layout_reads_back_as_gguf_dequantization(fmt, n, library):
    k = 96
    blocks = gguf_blocks(fmt, n, k, seed=n)
    got = ort_kernels.dequantize(interleave_x8(blocks, fmt), fmt, n, k, library)
    np.testing.assert_allclose(got, gguf_float(blocks, fmt), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_product_equals_the_int8_activation_emulation(fmt, m, library):
    n, k = 37, 160
    blocks = gguf_blocks(fmt, n, k, seed=m)
    x = np.random.default_rng(100 + m).standard_normal((m, k)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    y = ort_kernels.block_matmul(x, interleave_x8(blocks, fmt), fmt, n, library)
    w = gguf_float(blocks, fmt)
    ref = emulated(x, w)
    assert np.abs(y - ref).max() <= EMULATION_RTOL * np.abs(ref).max()
    exact = x.astype(np.float64) @ w.T
    assert np.abs(y - exact).max() <= 2e-2 * np.abs(exact).max()  # int8 activations: ~1/254 per element


def test_real_model_layers_through_the_kernel(model):
    """The shipped Q4_1 and Q8_0 tensors, a decode row and a prefill block."""
    for name in ("blk.5.ffn_down.weight", "token_embd.weight"):
        t = model.weights[name]
        raw = np.asarray(t.raw, dtype=np.uint8).reshape(t.shape[0], -1)
        x = np.random.default_rng(1).standard_normal((1 if name.startswith("token") else 6, t.shape[1]))
        x = x.astype(np.float32)
        y = ort_kernels.block_matmul(x, interleave_x8(raw, t.qtype), t.qtype, t.shape[0])
        ref = emulated(x, gguf_float(raw, t.qtype))
        assert np.abs(y - ref).max() <= EMULATION_RTOL * np.abs(ref).max(), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_negative_and_subnormal_scales_read_back_exactly(fmt, library):
    """Scales gguf's random test data never has: 0, negative, fp16 subnormals (the plain C path converts
    them itself)."""
    n, k = 8, 128
    blocks = gguf_blocks(fmt, n, k).copy()
    bpb = GGUF_BLOCK_BYTES[fmt]
    view = blocks.reshape(n, k // 32, bpb)
    for i, bits in enumerate((0x0000, 0x8001, 0x03FF, 0xBC00, 0x0001, 0x8000, 0x7BFF, 0x3555)):
        view[i, 0, 0:2] = np.frombuffer(np.uint16(bits).tobytes(), np.uint8)
        if fmt == "Q4_1":  # the minimum too
            view[i, 1, 2:4] = np.frombuffer(np.uint16(bits ^ 0x8000).tobytes(), np.uint8)
    got = ort_kernels.dequantize(interleave_x8(blocks, fmt), fmt, n, k, library)
    np.testing.assert_array_equal(got, gguf_float(blocks, fmt).astype(np.float32))
    x = np.random.default_rng(5).standard_normal((3, k)).astype(np.float32)  # and through the product's
    y = ort_kernels.block_matmul(x, interleave_x8(blocks, fmt), fmt, n, library)  # vector conversions
    ref = emulated(x, gguf_float(blocks, fmt))
    assert np.abs(y - ref).max() <= EMULATION_RTOL * np.abs(ref).max()


def test_isa_paths_agree():
    libs = LIBRARIES
    if len(libs) < 2:
        pytest.skip("one ISA path on this machine")
    blocks = gguf_blocks("Q4_1", 64, 256)
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    outs = [ort_kernels.block_matmul(x, interleave_x8(blocks, "Q4_1"), "Q4_1", 64, lib) for lib in libs]
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], rtol=1e-5, atol=1e-6)


def session(nodes, inputs, outputs, inits, threads=2):
    graph = helper.make_graph(nodes, "t", inputs, outputs, [onnx.numpy_helper.from_array(a, n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid(ort_kernels.DOMAIN, 1)])
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    ort_kernels.register(opts, threads)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def matmul_session(x8, fmt, n, k, threads=2, **attrs):
    attrs = {"K": k, "N": n, "format": fmt, **attrs}
    node = helper.make_node("BlockMatMul", ["x", "w"], ["y"], domain=ort_kernels.DOMAIN, **attrs)
    return session([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", "k"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", "n"])], [("w", x8)], threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_onnx_runtime_op_equals_the_library_call(fmt, threads):
    n, k = 203, 192
    blocks = gguf_blocks(fmt, n, k, seed=7)
    x8 = interleave_x8(blocks, fmt)
    ort_kernels.set_threads(threads)  # before the session: its kernels copy the task count when created
    sess = matmul_session(x8, fmt, n, k, threads)
    for rows in (1, 7, 17, 33):  # 17, 33: activation rows quantized in parallel tasks of 8
        x = np.random.default_rng(rows).standard_normal((1, rows, k)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert y.shape == (1, rows, n)
        np.testing.assert_array_equal(y[0], ort_kernels.block_matmul(x[0], x8, fmt, n))


def test_gather_returns_exact_rows_and_names_a_bad_id():
    n, k = 50, 64
    blocks = gguf_blocks("Q8_0", n, k, seed=4)
    node = helper.make_node("BlockGather", ["ids", "w"], ["y"], domain=ort_kernels.DOMAIN, K=k, N=n, format="Q8_0")
    sess = session([node], [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", "k"])], [("w", interleave_x8(blocks, "Q8_0"))])
    ids = np.array([[0, 49, 7]], dtype=np.int64)
    (y,) = sess.run(None, {"ids": ids})
    np.testing.assert_allclose(y[0], gguf_float(blocks, "Q8_0")[ids[0]], rtol=1e-6, atol=1e-9)
    for bad in (50, -1):
        with pytest.raises(Exception, match=f"token id {bad} outside"):
            sess.run(None, {"ids": np.array([[3, bad]], dtype=np.int64)})


def test_bad_shapes_and_attributes_are_clear_errors():
    n, k = 16, 64
    x8 = interleave_x8(gguf_blocks("Q4_1", n, k), "Q4_1")
    x = np.zeros((1, 2, k), dtype=np.float32)
    with pytest.raises(Exception, match="must be uint8"):  # N disagrees with the table
        matmul_session(x8, "Q4_1", 40, k).run(None, {"x": x})
    with pytest.raises(Exception, match="format 'Q5_K' unknown"):
        matmul_session(x8, "Q5_K", n, k).run(None, {"x": x})
    with pytest.raises(Exception, match="format 'a-very-long-format-name' unknown"):  # longer than any buffer guess
        matmul_session(x8, "a-very-long-format-name", n, k).run(None, {"x": x})
    with pytest.raises(Exception, match="last dimension must be K=64"):
        matmul_session(x8, "Q4_1", n, k).run(None, {"x": np.zeros((1, 2, 32), dtype=np.float32)})
    with pytest.raises(ConfigError, match="do not hold"):
        ort_kernels.block_matmul(x[0], x8[:, :-1], "Q4_1", n)


def test_build_is_cached_readable_by_all_and_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    first = ort_kernels.build()
    assert ort_kernels.build() is first and first.path.is_file()
    fresh = tmp_path / "built" / "lib.so"
    ort_kernels.compile_library(fresh, ort_kernels._compiler(), "x86-64" if platform.machine() == "x86_64" else "native")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o755 & ~umask  # another user of a shared cache can load it
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(ort_kernels.shutil, "which", lambda name: None)
    with pytest.raises(ort_kernels.KernelBuildError, match="need a C\\+\\+ compiler"):
        ort_kernels._compiler()
    with pytest.raises(ort_kernels.KernelBuildError, match="compiling edgellm's ONNX Runtime kernels failed"):
        ort_kernels.compile_library(tmp_path / "lib.so", "false")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # nothing half-written left behind


def test_cli_kernels_reports_the_library_it_built(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "EDGELLM_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli.main", "kernels", "--json"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["isa"] == ort_kernels.build().isa
    assert Path(data["library"]).is_file() and Path(data["library"]).is_relative_to(tmp_path)


@pytest.mark.parametrize("bits, symmetric, gguf_type", [(4, False, "Q4_1"), (4, True, "Q4_0"), (8, True, "Q8_0")])
def test_compressed_blocks_become_exact_gguf_blocks(bits, symmetric, gguf_type):
    """RTN (and GPTQ: the same grid rule) blocks of 32 with fp16 scales are a GGUF type exactly: gguf-py's
    dequantization of the attached blocks equals the MatMulNBits form's."""
    w = np.random.default_rng(bits).standard_normal((24, 96)).astype(np.float32) * 0.05
    bq = with_gguf_blocks(quantize_rtn(w, bits, symmetric=symmetric))
    assert bq.gguf_type == gguf_type
    np.testing.assert_array_equal(gguf_float(bq.gguf, gguf_type).astype(np.float32), bq.dequantize())


@pytest.mark.parametrize("case", ["2-bit", "8-bit asymmetric", "groups of 64", "scale not fp16"])
def test_other_blocks_keep_matmulnbits(case):
    w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    bq = {"2-bit": lambda: quantize_rtn(w, 2, symmetric=False),
          "8-bit asymmetric": lambda: quantize_rtn(w, 8, symmetric=False),
          "groups of 64": lambda: quantize_rtn(w, 4, block_size=64)}.get(case, lambda: None)()
    if case == "scale not fp16":
        bq = quantize_rtn(w, 4, symmetric=True)
        bq.scales = bq.scales * np.float32(1.0001)
    assert with_gguf_blocks(bq).gguf is None
