"""Structured pruning: tensors shrink, per-layer shapes flow through the reference, the compressed dir and
the ONNX export; removing structures that contribute exactly nothing leaves the model's output unchanged."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgellm.compress.passes import CompressState
from edgellm.compress.pipeline import load_compressed, run_recipe, write_compressed
from edgellm.compress.plan import CompressionPlan
from edgellm.compress.recipe import parse_recipe
from edgellm.errors import ConfigError
from edgellm.model.config import ModelConfig
from edgellm.model.loader import load_model
from edgellm.model.weights import WeightTensor
from edgellm.runtime.registry import create_backend
from tests.tiny_gguf import write_tiny_gguf

IDS = np.arange(30, 94)
# tiny model: hidden 64, 4 heads / 2 KV heads of 16, FFN 128, 2 layers -> 36864 linear weights per layer;
# one KV group = 6144, 64 FFN channels = 12288: both together are 25 % of the two layers' linear weights
DEAD_FRACTION = (6144 + 12288) / (2 * 36864)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "t.gguf")


def _with_dead_structures(path):
    """The tiny model with KV group 1 of layer 0 and FFN channels 0-63 of layer 1 contributing nothing
    (their output-projection columns are zero): what an exact importance must remove first."""
    model = load_model(path)
    for name, cols in (("blk.0.attn_output.weight", slice(32, 64)), ("blk.1.ffn_down.weight", slice(0, 64))):
        values = model.weights.float(name).copy()
        values[:, cols] = 0.0
        model.weights.replace(name, WeightTensor.from_array(name, values))
    return model


def _prune(model, **params):
    params = {"of": "layers", "tokens": 256, "window": 64, "fisher_window": 64, **params}
    recipe = parse_recipe({"name": "s", "passes": [{"pass": "prune_structured", **params}]}, "inline")
    return run_recipe(CompressState(model=model, plan=CompressionPlan()), recipe), recipe


def _logits(model, ids=IDS):
    return create_backend("reference", model).open_session().forward(ids, all_logits=True)


@pytest.mark.parametrize("importance, refit", [("energy", False), ("energy", True), ("fisher", True)])
def test_removing_dead_heads_and_channels_is_exact(tiny_path, importance, refit) -> None:
    dense = _with_dead_structures(tiny_path)
    expected = _logits(dense)
    state, _ = _prune(_with_dead_structures(tiny_path), sparsity=DEAD_FRACTION, refit=refit, refit_damp=0.0,
                      importance=importance)
    cfg = state.model.config
    assert cfg.layer_n_heads == (2, 4) and cfg.layer_n_kv_heads == (1, 2) and cfg.layer_ffn_sizes == (128, 64)
    w = state.model.weights
    assert w["blk.0.attn_q.weight"].shape == (32, 64) and w["blk.0.attn_k.weight"].shape == (16, 64)
    assert w["blk.0.attn_output.weight"].shape == (64, 32) and w["blk.1.ffn_down.weight"].shape == (64, 64)
    assert w["blk.1.ffn_gate.weight"].shape == (64, 64) and w["blk.1.ffn_up.weight"].shape == (64, 64)
    got = _logits(state.model)
    err = np.abs(got - expected).max()
    assert err < 1e-4, f"max |logit diff| {err:.3g} (logits up to {np.abs(expected).max():.3g})"
    # the oracle has teeth: at the same sparsity, the unmodified model (no dead structures) changes
    plain = load_model(tiny_path)
    before = _logits(plain)
    pruned_plain, _ = _prune(plain, sparsity=DEAD_FRACTION, refit=refit, refit_damp=0.0)
    assert np.abs(_logits(pruned_plain.model) - before).max() > 1e-2


def test_compressed_dir_records_shapes_and_exports_to_a_smaller_matching_onnx(tiny_path, tmp_path) -> None:
    from edgellm.export.onnx_export import export_onnx

    state, recipe = _prune(load_model(tiny_path), sparsity=0.3)
    cfg = state.model.config
    assert not cfg.uniform
    out = write_compressed(state, recipe, tmp_path / "comp")
    manifest = json.loads((out / "compressed.json").read_text())
    assert manifest["layer_shapes"]["layer_ffn_sizes"] == list(cfg.layer_ffn_sizes)
    reloaded = load_compressed(out)
    assert reloaded.config == cfg
    expected = _logits(reloaded)
    np.testing.assert_array_equal(expected, _logits(state.model))
    exact = CompressionPlan(accuracy_level=0, lm_head="fp32", lm_head_accuracy_level=0, name="exact")
    small = export_onnx(reloaded, tmp_path / "pruned-onnx", exact)
    full = export_onnx(load_model(tiny_path), tmp_path / "dense-onnx", exact)
    art = load_model(small)
    assert art.config == cfg  # the export's manifest carries the per-layer shapes
    got = create_backend("onnxruntime", art, threads=1).open_session().forward(IDS, all_logits=True)
    err = np.abs(got - expected).max()
    assert err < 1e-3, f"ORT vs reference on the pruned model: max |diff| {err:.3g}"
    # decode with the per-layer KV cache too: prefill 40, then one token at a time
    session = create_backend("onnxruntime", art, threads=1).open_session()
    session.forward(IDS[:40])
    steps = np.concatenate([session.forward(IDS[j:j + 1]) for j in range(40, 48)])
    assert np.abs(steps - expected[40:48]).max() < 1e-3
    size = {d: (d / "model.onnx.data").stat().st_size for d in (small, full)}
    assert size[small] < 0.85 * size[full], size


def test_sparsity_of_the_whole_model(tiny_path) -> None:
    state, _ = _prune(load_model(tiny_path), sparsity=0.2, of="model", importance="energy")
    report = state.report["prune_structured"]
    # greedy stops within half a structure of the target: here one FFN chunk = 6144 of 91008 parameters
    assert abs(report["removed_fraction_of_all_parameters"] - 0.2) < 0.5 * 6144 / report["parameters_before"]
    assert report["removed_layer_linear_fraction"] > 0.22  # the embedding is never pruned
    with pytest.raises(ConfigError, match="above max_layer_sparsity 0.6"):
        _prune(load_model(tiny_path), sparsity=0.55, of="model", max_layer_sparsity=0.6)


def test_owl_and_uniform_allocations(tiny_path) -> None:
    uniform, _ = _prune(load_model(tiny_path), sparsity=0.3, allocation="uniform", heads=False)
    assert uniform.model.config.layer_n_heads == (4, 4)
    sizes = uniform.model.config.layer_ffn_sizes
    assert sizes[0] == sizes[1] and sizes[0] % 32 == 0
    owl, _ = _prune(load_model(tiny_path), sparsity=0.3, allocation="owl", owl_lambda=0.1)
    report = owl.report["prune_structured"]
    assert len(report["owl_outlier_ratios"]) == 2
    assert 0.15 < report["removed_layer_linear_fraction"] < 0.45


def test_per_layer_config_validation() -> None:
    base = ModelConfig(architecture="llama", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128,
                       vocab_size=300, context_length=256)
    ok = dataclasses.replace(base, layer_n_heads=[2, 4], layer_n_kv_heads=[1, 2], layer_ffn_sizes=[96, 128])
    assert ok.layer_n_heads == (2, 4) and ok.q_size_at(0) == 32 and ok.ffn_size_at(0) == 96
    assert base.uniform and not ok.uniform and base.n_heads_at(1) == 4
    with pytest.raises(ConfigError, match="one value per layer"):
        dataclasses.replace(base, layer_ffn_sizes=(96,))
    with pytest.raises(ConfigError, match="layer 0: n_heads 3 is not a multiple of n_kv_heads 2"):
        dataclasses.replace(base, layer_n_heads=(3, 4))
    with pytest.raises(ConfigError, match="positive integers"):
        dataclasses.replace(base, layer_ffn_sizes=(0, 128))


@pytest.mark.parametrize("params, message", [
    ({"sparsity": 1.5}, r"sparsity must be a fraction in \(0, 1\), found 1.5"),
    ({"allocation": "random"}, r"allocation 'random' unknown; valid: global, owl, uniform"),
    ({"ffn_multiple": 0}, r"ffn_multiple must be a positive integer"),
    ({"sparsity": 0.5, "max_layer_sparsity": 0.4}, r"max_layer_sparsity must be in \[sparsity, 1\)"),
    ({"colour": 1}, r"unknown parameter\(s\) \['colour'\]; valid: allocation, calibration"),
])
def test_bad_structured_parameters_are_clear(params, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_recipe({"name": "x", "passes": [{"pass": "prune_structured", **params}]}, "inline")
