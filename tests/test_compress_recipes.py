"""Recipes, plans and the compress command: bad input lists valid options; plans flow into export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.compress.plan import CompressionPlan
from edgellm.compress.recipe import load_recipe, parse_recipe
from edgellm.errors import ConfigError, UnknownNameError
from tests.test_cli import edgellm


def test_unknown_pass_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown pass 'prune-magic'; valid passes: allocate, .*gptq, .*quantize"):
        parse_recipe({"name": "x", "passes": [{"pass": "prune-magic"}]}, "inline")


def test_bad_parameter_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['bitz'\]; valid: accuracy_level, format, lm_head"):
        parse_recipe({"name": "x", "passes": [{"pass": "quantize", "bitz": 3}]}, "inline")
    with pytest.raises(ConfigError, match=r"format 'int5' unknown; valid: auto, fp32, int8"):
        parse_recipe({"name": "x", "passes": [{"pass": "quantize", "format": "int5"}]}, "inline")
    with pytest.raises(ConfigError, match="recipe field 'passes' is missing"):
        parse_recipe({"name": "x"}, "inline")
    with pytest.raises(ConfigError, match=r"head_formats \['int5'\] invalid; valid: auto, int8, int4"):
        parse_recipe({"name": "x", "passes": [{"pass": "allocate", "head_formats": ["auto", "int5"]}]}, "inline")


def test_unknown_recipe_name_lists_the_shipped_ones():
    from pathlib import Path

    shipped = sorted(p.stem for p in (Path(__file__).parents[1] / "models" / "recipes").glob("*.toml"))
    assert {"gptq-int4", "haq-cpu-ort", "rtn-int4", "lossless"} <= set(shipped)
    with pytest.raises(UnknownNameError, match="valid recipes: " + ", ".join(shipped) + "$"):
        load_recipe("no-such-recipe")


def test_shipped_recipes_parse():
    assert load_recipe("rtn-int4").passes[0].params.format == "int4"
    assert load_recipe("haq-cpu-ort").passes[0].name == "allocate"


@pytest.mark.parametrize("data, message", [
    ({"overrides": ["int4"]}, "overrides must map"),
    ({"accuracy_level": True}, "accuracy_level must be 0-4"),
    ({"default": "int5"}, "format 'int5' for default is unknown"),
    ({"colour": "red"}, "unknown fields"),
])
def test_bad_plans(data, message, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        CompressionPlan.load(path)


def test_exporting_an_in_memory_description_twice_keeps_its_weights(model, tmp_path):
    from edgellm.export.onnx_export import effective_description, export_onnx
    from edgellm.model.loader import load_model
    from tests.tiny_gguf import write_tiny_gguf

    tiny = load_model(write_tiny_gguf(tmp_path / "t.gguf"))
    eff = effective_description(tiny, CompressionPlan(default="int8", lm_head="fp32"))
    export_onnx(eff, tmp_path / "a")
    export_onnx(eff, tmp_path / "b")  # release_float must not have dropped in-memory weights
    assert np.isfinite(eff.weights.float("blk.0.attn_q.weight")).all()


def test_compress_then_export_then_eval(tmp_path):
    comp = tmp_path / "comp"
    edgellm("compress", "--recipe", "rtn-int4", "-o", str(comp))
    manifest = json.loads((comp / "compressed.json").read_text())
    assert manifest["plan"]["default"] == "int4" and len(manifest["source"]["sha256"]) == 64
    ref = json.loads(edgellm("eval", "ppl", str(comp), "--max-tokens", "256", "--window", "128", "--json").stdout)
    out = tmp_path / "onnx"
    edgellm("export", "onnx", str(comp), "-o", str(out))
    exported = json.loads((out / "manifest.json").read_text())
    assert exported["plan"]["name"] == "rtn-int4"
    assert set(exported["layers"][k] for k in exported["layers"] if k.startswith("blk.")) == {
        "int4 RTN asymmetric from Q4_1 · edgellm BlockMatMul"}  # RTN blocks of 32 are exactly Q4_1
    ort = json.loads(edgellm("eval", "ppl", str(out), "--max-tokens", "256", "--window", "128", "--json").stdout)
    assert abs(ort["ppl"] / ref["ppl"] - 1) < 0.02  # int8 activations vs exact: within 2 %


def test_compress_errors_are_one_line():
    for args, message in [
        (("compress", "--recipe", "haq-cpu-ort", "-o", "/tmp/never"), "needs a budget"),
        (("compress", "--recipe", "rtn-int4", "--budget-ms-per-token", "5", "-o", "/tmp/never"), "needs --target"),
        (("compress", "--recipe", "rtn-int4", "--budget-mb", "10", "-o", "/tmp/never"), "does not even hold"),
    ]:
        proc = edgellm(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr


def _tiny_target(tmp_path, hidden=64, ffn=128, q=64, kv=32, vocab=None):
    """A target whose cost table covers the tiny model's shapes (latency grows with bytes, int4-sym cheapest)."""
    from edgellm.compress.target import TARGETS_DIR, CostEntry, CostTable

    shapes = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * ffn), (ffn, hidden)]
    per_weight = {"fp32": 4.0, "int8": 1.2, "int4": 1.3, "int4-sym": 0.8, "int2": 1.3}
    entries = {(k, n, f, 1): CostEntry(c * k * n / 1e3, c * k * n / 1e3, c * k * n / 1e3)
               for k, n in shapes for f, c in per_weight.items()}
    entries[(hidden, vocab, "int8", 1)] = CostEntry(5.0, 5.0, 5.0)
    CostTable(target="tiny", entries=entries, machine={}, threads=2, ort_version="test", overhead_us=50.0) \
        .save(tmp_path / "tiny.costs.json")
    text = (TARGETS_DIR / "cpu-ort.toml").read_text().replace('name = "cpu-ort"', 'name = "tiny"') \
        .replace('cost_table = "cpu-ort.costs.json"', 'cost_table = "tiny.costs.json"')
    (tmp_path / "tiny.toml").write_text(text)
    return tmp_path / "tiny.toml"


def _tiny_recipe(tmp_path, formats):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "t"\n[[passes]]\npass = "allocate"\nformats = {json.dumps(list(formats))}\n'
                      'calibration = "asyoulik.txt"\ntokens = 256\nwindow = 128\n')
    return recipe


def test_allocate_recipe_on_a_tiny_model_meets_size_and_latency_budgets(tmp_path):
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_1")
    from edgellm.model.loader import load_model

    vocab = load_model(gguf).config.vocab_size
    target = _tiny_target(tmp_path, vocab=vocab)
    recipe = _tiny_recipe(tmp_path, ["auto", "int8", "int4-sym", "int2"])
    out = tmp_path / "c"
    # linear layers of this model at int4-sym cost 0.8 us per 1000 weights; pick a budget between
    # all-int4-sym and all-lossless so the allocator has to mix
    n_weights = 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64)
    budget_ms = (50.0 + 5.0 + 1.0 * n_weights / 1e3) / 1e3
    proc = edgellm("compress", str(gguf), "--recipe", str(recipe), "--target", str(target), "--budget-ms-per-token",
                   f"{budget_ms:.6f}", "-o", str(out), "--cache-dir", str(tmp_path / "cache"))
    report = json.loads((out / "compressed.json").read_text())["report"]["allocate"]
    assert report["linear_us"] <= budget_ms * 1e3 - 55.0 + 1e-6
    counts = report["format_counts"]
    assert counts["int4-sym"] > 0 and sum(1 for c in counts.values() if c) >= 2, counts  # a mix, budget binds
    assert "plan:" in proc.stdout


def test_hardware_in_the_loop_records_predicted_and_measured(tmp_path):
    """On the tiny model with a deliberately wrong (tiny) cost table: the loop measures the real export,
    finds the prediction far off, and either re-solves or says plainly that no plan fits."""
    from edgellm.model.loader import load_model
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_1")
    target = _tiny_target(tmp_path, vocab=load_model(gguf).config.vocab_size)
    recipe = _tiny_recipe(tmp_path, ["auto", "int8", "int4-sym"])
    out = tmp_path / "c"
    proc = edgellm("compress", str(gguf), "--recipe", str(recipe), "--target", str(target), "--budget-ms-per-token",
                   "50", "--hardware-in-the-loop", "2", "-o", str(out), "--cache-dir", str(tmp_path / "cache"))
    history = json.loads((out / "compressed.json").read_text())["report"]["hardware_in_the_loop"]
    assert history[0]["measured_ms"] > 0 and history[0]["predicted_ms"] > 0
    assert history[-1]["measured_ms"] <= 50  # a 2-layer model decodes far under 50 ms/token
    assert "hardware in the loop 1" in proc.stderr


def test_gptq_pass_writes_blocks_that_export_and_reload_keep(tmp_path):
    from edgellm.model.loader import load_model
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="F32")
    recipe = tmp_path / "g.toml"
    recipe.write_text('name = "g"\n[[passes]]\npass = "gptq"\nbits = 4\nsymmetric = true\ntokens = 256\nwindow = 128\n')
    comp = tmp_path / "comp"
    edgellm("compress", str(gguf), "--recipe", str(recipe), "-o", str(comp))
    manifest = json.loads((comp / "compressed.json").read_text())
    report = manifest["report"]["gptq"]
    assert report["units"] == 8 and report["output_error_vs_rtn_median"] < 0.9  # GPTQ beats RTN on its inputs
    reloaded = load_model(comp)
    w = reloaded.weights["blk.1.ffn_down.weight"]
    assert w.qtype == "BLOCKQ" and w.blocks.bits == 4
    out = tmp_path / "onnx"
    edgellm("export", "onnx", str(comp), "-o", str(out))
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert layers["blk.1.ffn_down"] == "int4 gptq · edgellm BlockMatMul"  # GPTQ blocks of 32 are exactly Q4_1
    # damaged weights file: a clear error, not a traceback
    (comp / "weights.npz").write_bytes(b"broken")
    proc = edgellm("info", str(comp), check=False)
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr


def test_gptq_parameters_are_validated():
    with pytest.raises(ConfigError, match=r"skip_first must be in \[0, window\)"):
        parse_recipe({"name": "g", "passes": [{"pass": "gptq", "window": 128, "tokens": 256, "skip_first": 128}]}, "x")
    with pytest.raises(ConfigError, match="bits 5 unsupported; valid: 2, 3, 4, 8"):
        parse_recipe({"name": "g", "passes": [{"pass": "gptq", "bits": 5}]}, "x")


def test_head_formats_need_a_size_budget(tmp_path):
    from edgellm.model.loader import load_model
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_1")
    target = _tiny_target(tmp_path, vocab=load_model(gguf).config.vocab_size)
    recipe = _tiny_recipe(tmp_path, ["auto", "int4-sym"])
    recipe.write_text(recipe.read_text() + 'head_formats = ["auto", "int4"]\n')
    proc = edgellm("compress", str(gguf), "--recipe", str(recipe), "--target", str(target), "--budget-ms-per-token",
                   "5", "-o", str(tmp_path / "c"), "--cache-dir", str(tmp_path / "cache"), check=False)
    assert proc.returncode == 2 and "head_formats other than auto are chosen under a size budget only" in proc.stderr
