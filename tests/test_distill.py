"""Knowledge distillation on a tiny model: it lowers the held-out KL to the teacher, is seeded, writes the
student's weights back, and rejects bad parameters with clear messages."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.compress.distill import DistillParams, default_layers, distill_windows
from edgellm.compress.passes import CompressState
from edgellm.compress.pipeline import run_recipe
from edgellm.compress.plan import CompressionPlan
from edgellm.compress.recipe import parse_recipe
from edgellm.errors import ConfigError
from edgellm.model.loader import load_model
from tests.tiny_gguf import write_tiny_gguf

DISTILL = {"pass": "distill", "window": 64, "tokens": 4096, "heldout_tokens": 256, "lr": 1e-3, "warmup": 2}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "t.gguf")


def _run(path, steps: int, seed: int = 0):
    recipe = parse_recipe({"name": "kd", "seed": seed, "passes": [
        {"pass": "prune_structured", "sparsity": 0.3, "tokens": 256, "window": 64, "fisher_window": 64},
        {**DISTILL, "steps": steps}]}, "inline")
    return run_recipe(CompressState(model=load_model(path), plan=CompressionPlan(), seed=seed), recipe)


def test_distillation_lowers_heldout_kl_and_writes_the_student_back(tiny_path) -> None:
    state = _run(tiny_path, steps=32)
    report = state.report["distill"]
    # observed (seeded, energy importance): KL 0.113 -> 0.103 (0.91x) after 32 steps; the hidden loss falls too
    assert report["heldout_kl_after"] < 0.95 * report["heldout_kl_before"], report
    assert report["heldout_hidden_after"] < report["heldout_hidden_before"], report
    assert report["steps"] == 32 and report["train_tokens"] == 32 * 64
    pruned_only = _run(tiny_path, steps=1)  # a 1-step student: the weights moved in training
    moved = np.abs(state.model.weights.float("blk.0.ffn_up.weight")
                   - pruned_only.model.weights.float("blk.0.ffn_up.weight")).max()
    assert moved > 1e-4 and "blk.1.attn_norm.weight" in state.rewritten and "output_norm.weight" in state.rewritten
    assert "token_embd.weight" not in state.rewritten  # the tied embedding stays frozen


def test_distillation_is_seeded(tiny_path) -> None:
    a, b = _run(tiny_path, steps=2, seed=3), _run(tiny_path, steps=2, seed=3)
    np.testing.assert_array_equal(a.model.weights.float("blk.1.ffn_down.weight"),
                                  b.model.weights.float("blk.1.ffn_down.weight"))


def test_training_and_heldout_windows_are_disjoint() -> None:
    ids = list(range(10_000))
    train, heldout = distill_windows(ids, DistillParams(window=100, tokens=2000, heldout_tokens=500))
    assert len(train) == 20 and len(heldout) == 5
    assert max(max(w) for w in train) < min(min(w) for w in heldout)
    with pytest.raises(ConfigError, match="needs tokens \\+ heldout_tokens = 10500"):
        distill_windows(ids, DistillParams(window=100, tokens=10_000, heldout_tokens=500))
    assert default_layers(30) == (7, 14, 21, 29) and default_layers(2) == (0, 1)


@pytest.mark.parametrize("params, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"lr": -1.0}, "lr and temperature must be > 0"),
    ({"window": 512, "tokens": 256}, "need tokens >= window"),
    ({"hidden_layers": [-2]}, r"hidden_layers must be layer indices >= 0"),
    ({"teacher": "big"}, r"unknown parameter\(s\) \['teacher'\]; valid: calibration, heldout_tokens"),
])
def test_bad_distill_parameters_are_clear(params, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_recipe({"name": "x", "passes": [{"pass": "distill", **params}]}, "inline")


def test_hidden_layers_beyond_the_model_are_rejected(tiny_path) -> None:
    recipe = parse_recipe({"name": "x", "passes": [{**DISTILL, "steps": 1, "hidden_layers": [5]}]}, "inline")
    with pytest.raises(ConfigError, match=r"hidden_layers \[5\] out of range; the model has layers 0-1"):
        run_recipe(CompressState(model=load_model(tiny_path), plan=CompressionPlan()), recipe)


def test_trace_matches_the_reference_and_backpropagates_with_per_layer_kv_heads(tiny_path) -> None:
    import torch

    from edgellm.model.llama import LlamaModel
    from edgellm.runtime.registry import create_backend
    from tests.test_structured_prune import DEAD_FRACTION, _prune, _with_dead_structures

    state, _ = _prune(_with_dead_structures(tiny_path), sparsity=DEAD_FRACTION)
    assert state.model.config.layer_n_kv_heads == (1, 2)
    ids = np.arange(30, 90)
    student = LlamaModel(state.model)
    for t in student.layers[0].values():
        t.requires_grad_(True)
    logits, hidden = student.trace(torch.as_tensor(ids), (0, 1))
    expected = create_backend("reference", state.model).open_session().forward(ids, all_logits=True)
    assert np.abs(logits.detach().numpy() - expected).max() < 1e-4 and set(hidden) == {0, 1}
    (logits.pow(2).mean() + hidden[0].pow(2).mean()).backward()
    assert all(t.grad is not None and bool(t.grad.abs().sum() > 0) for t in student.layers[0].values())
