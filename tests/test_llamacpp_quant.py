"""llama.cpp's quantizer through edgellm.bench.llamacpp_quant: real files, checked with gguf's own dequantizer."""

from __future__ import annotations

import llama_cpp  # noqa: F401  (the bench extra; scripts/setup.sh dev installs it: fail, never skip)
import numpy as np
import pytest

from edgellm.errors import UnknownNameError


def test_requantize_tiny_gguf_to_q8_0_matches_the_source_within_q8_0_error(tmp_path):
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize

    from edgellm.bench.llamacpp_quant import gguf_sizes, requantize
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend
    from tests.tiny_gguf import tiny_tensors, write_tiny_gguf

    # llama.cpp knows no "gpt2" pre-tokenizer (the tiny file's default); SmolLM2's own one loads
    pre = {"tokenizer.ggml.pre": ("smollm", GGUFValueType.STRING)}
    source = write_tiny_gguf(tmp_path / "src.gguf", qtype="F32", extra_metadata=pre)
    out = requantize(source, "Q8_0", out_dir=tmp_path / "cache")
    assert out.is_file() and not list((tmp_path / "cache").glob("*.partial"))
    assert requantize(source, "Q8_0", out_dir=tmp_path / "cache") == out  # cached
    written = {t.name: t.values for t in tiny_tensors(qtype="F32").values()}
    checked = 0
    for t in GGUFReader(out).tensors:
        if not t.name.startswith("blk.") or not t.name.endswith(("attn_q.weight", "ffn_down.weight")):
            continue
        assert t.tensor_type.name == "Q8_0", t.name
        got = dequantize(t.data, t.tensor_type).reshape(written[t.name].shape)
        want = written[t.name]
        blocks = want.reshape(-1, 32)
        # Q8_0: q = round(x / d) with d = amax/127, then d stored as fp16: |x - d16*q| <= d/2 + 127 |d - d16|
        d = np.abs(blocks).max(-1, keepdims=True) / 127
        bound = d / 2 + 127 * d * 2.0**-11
        err = np.abs(got.reshape(-1, 32) - blocks)
        assert (err <= bound * 1.001 + 1e-7).all(), (
            f"{t.name}: error up to {(err / bound).max():.3f}x the Q8_0 bound (max {err.max():.3g})")
        checked += 1
    assert checked == 4  # 2 layers x (attn_q, ffn_down)
    sizes = gguf_sizes(out)
    assert sizes.tensor_types == {"Q8_0": sizes.tensor_types["Q8_0"]}
    assert sizes.linear_bits_per_weight == pytest.approx(8.5)  # 34 bytes per 32 weights
    assert sizes.file_bytes == out.stat().st_size
    # llama.cpp itself loads and runs the file
    backend = create_backend("llama.cpp", load_model(out), threads=1)
    logits = backend.open_session(max_tokens=8).forward(np.arange(3, 9))
    assert np.isfinite(logits).all()


def test_unknown_type_lists_the_valid_ones(tmp_path):
    from edgellm.bench.llamacpp_quant import DEFAULT_TYPES, requantize, type_names

    assert set(DEFAULT_TYPES) <= set(type_names())
    with pytest.raises(UnknownNameError, match=r"unknown llama.cpp quantization type 'Q3_K_XL'; valid .*Q3_K_M.*Q8_0"):
        requantize(tmp_path / "missing.gguf", "Q3_K_XL")
