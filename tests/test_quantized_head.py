"""The lm_head (tied: the token embedding too) as one quantized tensor, and fp16 scales in stored blocks.

Oracles: the reference model on the same dequantized weights (ONNX Runtime logits within LOGIT_ATOL at
exact fp32 activations), numpy for the nibble gather, exact equality for the fp16 round trip.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from edgellm.compress.plan import QUANT_FORMATS, CompressionPlan
from edgellm.compress.rtn import head_bytes, quantize_head
from edgellm.export.block_formats import quantize_format, quantize_rtn
from edgellm.export.onnx_export import export_onnx
from edgellm.model.loader import load_model
from edgellm.runtime.registry import create_backend
from tests.test_compress_recipes import _tiny_recipe, edgellm
from tests.tiny_gguf import write_tiny_gguf

LOGIT_ATOL = 1e-3  # fp32 rounding through a 2-layer model (observed ~1e-5)
EXACT = CompressionPlan(accuracy_level=0, lm_head_accuracy_level=0, name="exact")


@pytest.fixture
def tiny(tmp_path):
    return load_model(write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_1", embd_qtype="Q8_0"))


def test_rtn_scales_and_minima_are_fp16_values():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 128)).astype(np.float32) * 0.05
    for fmt in ("int4", "int4-sym", "int3-g64", "int2-g64", "int8"):
        b = quantize_format(w, fmt)
        assert np.array_equal(b.scales.astype(np.float16).astype(np.float32), b.scales), fmt
        spec = QUANT_FORMATS[fmt]
        assert b.stored_nbytes == spec.nbytes(128, 8), fmt  # codes + 2 bytes per scale (and per minimum)


def test_stored_blocks_keep_fp16_scales_and_rebuild_offsets_exactly():
    from edgellm.compress.pipeline import _compact_scales, _read_scales

    rng = np.random.default_rng(1)
    for sym in (False, True):
        b = quantize_rtn(rng.standard_normal((16, 96)).astype(np.float32), 4, 32, symmetric=sym)
        arrays = _compact_scales("w", b)
        assert "w|scales16" in arrays and "w|scales" not in arrays
        assert ("w|mins16" in arrays) == (not sym) and "w|offsets" not in arrays
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        buf.seek(0)
        with np.load(buf) as data:
            scales, offsets = _read_scales(data, "w", b.zero_point)
        assert np.array_equal(scales, b.scales)
        assert (offsets is None) if sym else np.array_equal(offsets, b.block_offsets)


def test_free_form_scales_are_stored_in_fp32():
    from edgellm.compress.pipeline import _compact_scales

    b = quantize_rtn(np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32), 4, 32, symmetric=False)
    b.scales = b.scales * np.float32(1 + 2**-20)  # not an fp16 value any more
    assert set(_compact_scales("w", b)) == {"w|scales", "w|offsets"}


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quantized_tied_head_exports_and_matches_the_reference(tiny, tmp_path, fmt):
    before = head_bytes(tiny, "auto")
    quantize_head(tiny, fmt)
    assert tiny.weights["token_embd.weight"].qtype == "BLOCKQ" and tiny.lm_head_name() == "token_embd.weight"
    assert head_bytes(tiny, "auto") == QUANT_FORMATS[fmt].nbytes(tiny.config.hidden_size, tiny.config.vocab_size)
    assert (head_bytes(tiny, "auto") < before) == (fmt == "int4")
    art = export_onnx(tiny, tmp_path / "onnx", EXACT)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["layers"]["token_embd"].endswith("(gather)"), manifest["layers"]["token_embd"]
    ids = np.random.default_rng(3).integers(0, tiny.config.vocab_size, size=40)
    ours = create_backend("onnxruntime", load_model(art), threads=1).open_session(max_tokens=64).forward(ids, all_logits=True)
    ref = create_backend("reference", tiny).open_session(max_tokens=64).forward(ids, all_logits=True)
    assert np.abs(ours - ref).max() < LOGIT_ATOL


def test_nibble_gather_equals_numpy_dequantization(tiny, tmp_path):
    """The embedding rows the graph builds from 4-bit blocks (BitShift nibbles, scales, offsets) equal
    BlockQuantized.dequantize rows: checked through logits of a zero-layer path is not possible, so via the
    first hidden state — token ids that differ only in their embedding give logits that differ."""
    import onnx
    import onnxruntime as ort

    from edgellm.export.onnx_builder import GraphBuilder
    from edgellm.export.onnx_graph import OPSET, embedding

    quantize_head(tiny, "int4")
    blocks = tiny.weights["token_embd.weight"].blocks
    b = GraphBuilder()
    ids = b.add_input("ids", onnx.TensorProto.INT64, [1, "S"])
    out = embedding(b, ids, blocks, tiny.config.hidden_size)
    b.add_output(out, onnx.TensorProto.FLOAT, ["S", tiny.config.hidden_size])  # 2-D token rows
    sess = ort.InferenceSession(b.model("embed", OPSET).SerializeToString())
    tokens = np.array([[0, 5, tiny.config.vocab_size - 1, 7]], np.int64)
    got = sess.run(None, {"ids": tokens})[0]
    np.testing.assert_array_equal(got, blocks.dequantize()[tokens[0]])


def test_allocator_spends_the_bytes_a_quantized_head_frees(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_1", embd_qtype="Q8_0", vocab=4096)
    model = load_model(gguf)
    recipe = _tiny_recipe(tmp_path, ["auto", "int2"])
    text = recipe.read_text() + 'head_formats = ["auto", "int4"]\n'
    recipe.write_text(text)
    from edgellm.compress.rtn import linear_bytes, other_bytes

    lossless, _ = linear_bytes(model, CompressionPlan())
    freed = head_bytes(model, "auto") - head_bytes(model, "int4")
    assert freed > lossless // 4  # the tiny model's head is large next to its linears
    # a file budget that holds every linear lossless only if the head gives up its Q8_0 bytes
    container = gguf.stat().st_size - other_bytes(model) - lossless  # metadata, tokenizer, alignment
    assert container > 0
    budget_mb = (gguf.stat().st_size - freed + 64) / 2**20
    out = tmp_path / "c"
    edgellm("compress", str(gguf), "--recipe", str(recipe), "--budget-mb", f"{budget_mb:.9f}", "-o", str(out),
            "--cache-dir", str(tmp_path / "cache"))
    report = json.loads((out / "compressed.json").read_text())["report"]["allocate"]
    assert set(report["lm_head_tried"]) == {"auto", "int4"}
    tried = report["lm_head_tried"]
    if isinstance(tried["auto"], float) and tried["auto"] <= tried["int4"]:
        pytest.fail(f"the allocator kept the Q8_0 head although int4 + lossless linears predicts less loss: {tried}")
    assert report["lm_head"] == "int4" and report["format_counts"]["int2"] == 0, report
    compressed = load_model(out)
    assert compressed.weights["token_embd.weight"].qtype == "BLOCKQ"
    stored = container + other_bytes(compressed) + linear_bytes(compressed, compressed.metadata["plan"])[0]
    assert stored <= budget_mb * 2**20
