"""The decode-time ablation behind issue 3's profile: the export records its lowering, the ablation is
flagged and really differs, and the profiler sees the graph the docs describe (one Gemm per Q4_1 linear)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from edgellm.export.onnx_export import export_onnx
from edgellm.export.onnx_graph import LoweringOptions
from edgellm.model.loader import load_model
from edgellm.runtime.registry import create_backend


@pytest.fixture(scope="module")
def pair(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    exact = export_onnx(model, root / "lossless", options=LoweringOptions(block_kernel="matmulnbits"))
    dropped = export_onnx(load_model(None), root / "no-offsets",
                          options=LoweringOptions(offset_sums="drop", block_kernel="matmulnbits"))
    return exact, dropped


def test_manifest_records_the_lowering_and_the_ablation_is_flagged(pair, caplog):
    exact, dropped = pair
    assert json.loads((exact / "manifest.json").read_text())["lowering"]["offset_sums"] == "reducesum"
    assert json.loads((dropped / "manifest.json").read_text())["lowering"]["offset_sums"] == "drop"
    with caplog.at_level(logging.WARNING):
        create_backend("onnxruntime", load_model(dropped), threads=2)
    assert "timing ablation" in caplog.text


def test_the_correction_is_what_makes_the_weights_q4_1(pair, reference, alice_ids):
    exact, dropped = pair
    ids = np.asarray(alice_ids[:32])
    ref = reference.open_session(max_tokens=64).forward(ids, all_logits=True)
    ours = [create_backend("onnxruntime", load_model(d), threads=2).open_session(max_tokens=64).forward(ids, all_logits=True)
            for d in (exact, dropped)]
    err_exact, err_dropped = (np.abs(o - ref).max() for o in ours)
    # int8 activations: measured max 1.96 on a logit of ~30 over these 32 positions; without the correction 37.7
    assert err_exact < 3.0 and err_dropped > 10 * err_exact, (err_exact, err_dropped)


def test_decode_profile_sees_one_gemm_per_corrected_linear(pair, model):
    from edgellm.bench.offset_ablation import decode_profile

    exact, _ = pair
    profile = decode_profile(exact, steps=8)
    assert abs(sum(row["share"] for row in profile.values()) - 1) < 1e-9
    n_layers = model.config.n_layers  # fused QKV, o, fused gate|up, down: 4 Q4_1 linears a layer
    assert profile["Gemm"]["nodes_per_step"] == 4 * n_layers
    assert profile["MatMulNBits"]["nodes_per_step"] == 4 * n_layers + 1  # + the Q8_0 lm_head
    assert "Add" not in profile  # the correction's sum is the Gemm's C input


def test_default_export_profile_is_one_block_matmul_per_linear(artifact, model):
    """The default export: the correction's Gemm/ReduceSum/Reshape are gone, one BlockMatMul per linear."""
    from edgellm.bench.offset_ablation import decode_profile

    profile = decode_profile(artifact, steps=8)
    n_layers = model.config.n_layers
    assert profile["BlockMatMul"]["nodes_per_step"] == 4 * n_layers + 1  # + the Q8_0 lm_head
    assert {"Gemm", "ReduceSum", "MatMulNBits"}.isdisjoint(profile)


def test_lowering_options_must_agree_with_the_plan(model, tmp_path):
    from edgellm.compress.plan import PRESETS
    from edgellm.errors import ConfigError

    with pytest.raises(ConfigError, match="disagree with plan 'lossless-exact' \\(0/0\\)"):
        export_onnx(model, tmp_path / "x", PRESETS["lossless-exact"], options=LoweringOptions(offset_sums="drop"))
    assert not (tmp_path / "x").exists()
