"""Targets as data, cost tables, and `edgellm profile` (issue 4, item 5)."""

from __future__ import annotations

import argparse
import json
import os
import platform

import pytest

from edgellm.compress.target import (
    TARGETS_DIR,
    CostEntry,
    CostTable,
    export_linears,
    linear_shapes,
    load_target,
    target_names,
)
from edgellm.errors import ConfigError, UnknownNameError
from tests.tiny_gguf import write_tiny_gguf

CPU_ORT = (TARGETS_DIR / "cpu-ort.toml").read_text()


def _table(**changes) -> CostTable:
    fields = dict(target="cpu-ort", entries={(64, 64, "int4", 1): CostEntry(2.0, 1.5, 3.0),
                                              (64, 64, "int8", 1): CostEntry(1.0, 0.5, 1.5)},
                  machine={"machine": "x86_64"}, threads=2, ort_version="1.32.0", repeats=3, overhead_us=100.0)
    fields.update(changes)
    return CostTable(**fields)


# ---- targets --------------------------------------------------------------------------------------------

def test_shipped_targets_load_with_every_field():
    assert {"cpu-ort", "rpi5-cortex-a76-ort"} <= set(target_names())
    t = load_target("cpu-ort")
    assert (t.name, t.backend, t.threads, t.accuracy_level, t.arch) == ("cpu-ort", "onnxruntime", 2, 4, None)
    assert t.formats["linear"] == ("fp32", "int8", "int4", "int4-sym", "int2")
    assert t.formats["lm_head"] == ("fp32", "int8")
    assert t.memory_limit_mb > 0 and t.energy.power_compute_w > t.energy.power_idle_w > 0 and t.energy.source
    assert t.cost_table == TARGETS_DIR / "cpu-ort.costs.json"
    pi = load_target("rpi5-cortex-a76-ort")
    assert (pi.threads, pi.arch) == (4, "aarch64")
    assert load_target(TARGETS_DIR / "cpu-ort.toml") == t  # a path works as well as a name


def test_unknown_target_lists_the_valid_names():
    with pytest.raises(UnknownNameError, match=r"unknown target 'nope'.*cpu-ort.*rpi5-cortex-a76-ort"):
        load_target("nope")


def test_target_missing_fields_names_the_file_and_every_field(tmp_path):
    text = "\n".join(line for line in CPU_ORT.splitlines()
                     if not line.startswith(("threads", "power_idle_w", "lm_head =", "cost_table")))
    bad = tmp_path / "broken.toml"
    bad.write_text(text.replace('name = "cpu-ort"', 'name = "broken"'))
    with pytest.raises(ConfigError) as err:
        load_target(bad)
    message = str(err.value)
    assert str(bad) in message
    missing = message.split("missing field(s) ")[1].split(";")[0].split(", ")
    assert missing == ["threads", "cost_table", "formats.lm_head", "energy.power_idle_w"]


def test_target_bad_values_are_all_reported(tmp_path):
    text = (CPU_ORT.replace('name = "cpu-ort"', 'name = "other"').replace("threads = 2", "threads = 0")
            .replace('"int4-sym", "int2"]', '"int4-sym", "int3"]').replace('backend = "onnxruntime"', 'backend = "tpu"'))
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_target(bad)
    message = str(err.value)
    for expected in ("'other' differs from the file name 'bad.toml'", "backend 'tpu' unknown", "threads must be",
                     "formats.linear must be", "int3"):
        assert expected in message, message


# ---- cost tables ----------------------------------------------------------------------------------------

def test_cost_table_round_trip_and_missing_entry(tmp_path):
    table = _table(extra={"note": "x"})
    path = table.save(tmp_path / "t.costs.json")
    loaded = CostTable.load(path)
    assert loaded == table
    assert loaded.cost_us(64, 64, "int4") == 2.0 and loaded.entries[(64, 64, "int4", 1)].p90_us == 3.0
    with pytest.raises(UnknownNameError, match=r"no entry for K=64, N=64, format=int2, M=1; formats measured "
                                               r"for this shape: int4, int8; re-measure with: edgellm profile"):
        loaded.cost_us(64, 64, "int2")
    with pytest.raises(UnknownNameError, match=r"K=128, N=64.*measured \(K, N, M\): \(64, 64, 1\)"):
        loaded.cost_us(128, 64, "int4")
    est = loaded.scaled(2.5, "board", "x2.5 of cpu-ort", machine={"machine": "aarch64"}, threads=4)
    assert est.estimated and est.cost_us(64, 64, "int4") == 5.0 and est.overhead_us == 250.0
    assert (est.threads, est.machine["machine"], est.extra["based_on"]["threads"]) == (4, "aarch64", 2)
    assert CostTable.load(est.save(tmp_path / "est.json")) == est


def test_cost_table_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.costs.json"
    _table().save(path)
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _table(overhead_us=1.0).save(path)
    assert path.read_bytes() == before  # the old table is intact
    assert [p.name for p in tmp_path.iterdir()] == ["t.costs.json"]  # and no temporary file is left


def test_cost_table_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CostTable.load(bad)
    bad.write_text(json.dumps({"target": "x", "entries": []}))
    with pytest.raises(ConfigError, match="missing field.*estimated.*source.*machine"):
        CostTable.load(bad)


def test_export_linears_groups_fused_layers():
    from edgellm.model.config import ModelConfig

    cfg = ModelConfig("llama", n_layers=1, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128, vocab_size=100,
                      context_length=64)
    layers = {f"blk.0.{r}": "Q4_1 transcode" for r in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    layers |= {"blk.0.ffn_down": "int2 RTN asymmetric from Q4_1", "lm_head": "Q8_0 transcode"}
    formats, shapes = export_linears(cfg, layers)
    assert formats == {"blk.0.attn_qkv": "int4", "blk.0.attn_output": "int4", "blk.0.ffn_gate_up": "int4",
                       "blk.0.ffn_down": "int2", "lm_head": "int8"}
    assert shapes["blk.0.attn_qkv"] == (64, 64 + 2 * 32) and shapes["lm_head"] == (64, 100)
    layers["blk.0.attn_k"] = "fp32 from Q4_1"
    with pytest.raises(ConfigError, match="blk.0.attn_qkv: parts .* different formats"):
        export_linears(cfg, layers)
    layers["blk.0.attn_k"] = "Q4_1 transcode · edgellm BlockMatMul"  # the default export: not in the table
    with pytest.raises(ConfigError, match="BlockMatMul, which the cost table has not timed"):
        export_linears(cfg, layers)


# ---- profiling ------------------------------------------------------------------------------------------

def test_quick_profile_gives_positive_costs_for_every_entry():
    from edgellm.bench.layer_profile import format_table, profile_target

    table = profile_target(load_target("cpu-ort"), shapes={"a": (64, 64), "b": (128, 64)},
                           formats=["fp32", "int8", "int4"], threads=1, repeats=3, progress=False, overhead=False,
                           working_set_mb=0.1)
    assert set(table.entries) == {(k, 64, f, 1) for k in (64, 128) for f in ("fp32", "int8", "int4")}
    for key, e in table.entries.items():
        assert 0 < e.p10_us <= e.median_us <= e.p90_us, (key, e)
    assert not table.estimated and table.threads == 1 and table.ort_version and table.overhead_us is None
    assert table.extra["copies"]["64x64 fp32 M=1"] == 7  # ceil(0.1 MB / 16 KB) copies, each its own weights
    assert table.extra["copies"]["128x64 int4 M=1"] > table.extra["copies"]["128x64 int8 M=1"] > 7
    assert "128 x 64" in format_table(table)


def test_copies_and_working_sets():
    from edgellm.bench.layer_profile import MAX_COPIES, MAX_COPIES_PREFILL, model_working_sets_mb, n_copies

    assert n_copies(2**20, 1, 64) == 64 and n_copies(2**20, 1, 0) == 1
    assert n_copies(100, 1, 64) == MAX_COPIES and n_copies(100, 128, 64) == MAX_COPIES_PREFILL
    assert n_copies(113 * 2**20, 1, 400) == 1  # the fp32 lm_head already streams from memory
    sets = model_working_sets_mb()  # SmolLM2: 30 layers x 3.54 M block weights
    assert sets["fp32"] == pytest.approx(30 * 3_538_944 * 4 / 2**20)
    assert sets["fp32"] > sets["int8"] > sets["int4"] > sets["int4-sym"] > sets["int2"]


def test_profile_measures_overhead_on_a_tiny_model(tmp_path):
    from edgellm.bench.layer_profile import profile_target
    from edgellm.model.loader import load_model

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_1", embd_qtype="Q8_0")  # the default model's types
    shapes = linear_shapes(load_model(tiny).config)
    table = profile_target(load_target("cpu-ort"), shapes=shapes, threads=1, repeats=3, progress=False, model=tiny,
                           working_set_mb=0)
    assert len(table.entries) == 4 * 5 + 2  # every linear format for 4 roles, fp32/int8 for the lm_head
    info = table.extra["overhead"]
    assert info["linears"] == {"int4": 2 * 4, "int8": 1}, info  # Q4_1 runs the int4 graph, Q8_0 the int8 one
    assert table.overhead_us == pytest.approx(info["decode_us_per_token"] - info["linear_sum_us"], abs=1e-3)
    assert info["decode_us_per_token"] > 0


def test_profile_refuses_unknown_formats_and_other_boards():
    from edgellm.bench.layer_profile import plan_jobs, profile_main
    from edgellm.compress.target import check_machine

    with pytest.raises(ConfigError, match="does not run int2 for lm_head layers; valid: fp32, int8"):
        plan_jobs(load_target("cpu-ort"), {"lm_head": (64, 128)}, ["int2"], (1,))
    pi = load_target("rpi5-cortex-a76-ort")
    if platform.machine() != "aarch64":
        with pytest.raises(ConfigError, match="aarch64 board but this machine is"):
            check_machine(pi)
        args = argparse.Namespace(target=pi.name, output="unused.json", threads=None, repeats=1, prefill=False,
                                  no_overhead=True)
        with pytest.raises(ConfigError):
            profile_main(args)


def test_profile_cli_parser_and_unknown_target():
    from edgellm.bench.layer_profile import add_profile_parser, profile_main

    parser = argparse.ArgumentParser(prog="edgellm")
    add_profile_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--target", "cpu-ort", "-o", "x.json", "--threads", "2", "--repeats",
                              "7", "--prefill"])
    assert (args.command, args.target, args.output, args.threads, args.repeats, args.prefill) == \
        ("profile", "cpu-ort", "x.json", 2, 7, True)
    defaults = parser.parse_args(["profile", "--target", "cpu-ort"])
    assert (defaults.output, defaults.threads, defaults.working_set_mb, defaults.no_overhead) == (None, None, None, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["profile"])  # --target is required
    with pytest.raises(UnknownNameError, match="valid targets: cpu-ort, rpi5-cortex-a76-ort"):
        profile_main(parser.parse_args(["profile", "--target", "nope"]))


# ---- the committed tables -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cpu-ort", "rpi5-cortex-a76-ort"])
def test_committed_cost_table_covers_the_default_model(name, model):
    target = load_target(name)
    table = target.load_cost_table()
    assert table.target == name and table.accuracy_level == target.accuracy_level
    for role, (k, n) in linear_shapes(model.config).items():
        for fmt in target.formats["lm_head" if role == "lm_head" else "linear"]:
            assert table.cost_us(k, n, fmt) > 0, (role, fmt)
    assert table.overhead_us is not None and table.overhead_us > 0
    if name == "cpu-ort":
        assert not table.estimated and table.repeats >= 20
    else:  # no Pi 5 here: the table must say it is an estimate and from what
        assert table.estimated and "estimate" in table.source.lower() and table.extra["based_on"]["target"] == "cpu-ort"


def test_profile_main_writes_the_table_it_prints(tmp_path):
    from edgellm.bench.layer_profile import add_profile_parser, profile_main

    parser = argparse.ArgumentParser(prog="edgellm")
    add_profile_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "costs.json"
    printed: list[str] = []
    args = parser.parse_args(["profile", "--target", "cpu-ort", "-o", str(out), "--repeats", "1", "--no-overhead",
                              "--working-set-mb", "0"])
    assert profile_main(args, write=printed.append) == 0
    table = CostTable.load(out)
    assert len(table.entries) == 4 * 5 + 2 and table.threads == 2  # the target's threads by default
    assert "ffn_gate_up" in printed[0] and printed[-1] == f"wrote {out}"
