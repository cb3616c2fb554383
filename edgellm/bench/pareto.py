"""Quality vs size vs speed, every method through the same evaluator (issue 4's results table).

    python -m edgellm.bench.pareto --out bench_results/pareto     # writes pareto.json, pareto.md, pareto.png

Rows are data: the lossless transcode, uniform RTN formats (UNIFORM_FORMATS), every recipe in
models/recipes/ (a recipe with an allocate pass runs once per budget: bits/weight of the linear layers, or
ms/token on its target; other recipes, e.g. GPTQ or pruning, run once), and llama.cpp's own types made
from the same GGUF by llama.cpp's quantizer (edgellm.bench.llamacpp_quant). A new recipe joins the table
by being added to models/recipes/.

Every row is scored on alice29.txt (first 8192 tokens, windows of 512; calibration uses asyoulik.txt):
  ppl ref     the exact reference (torch, fp32 activations) on the weights the row stores; llama.cpp's
              files are dequantized by gguf, so both sides are compared on their weights alone
  ppl engine  the row's runtime: ONNX Runtime (int8 activations) for plans that export, llama.cpp for its
              files (it quantizes activations to 8 bits too); the reference for 3-bit plans (no ORT kernel)
Size, like with like: "model MB" is a whole GGUF-style file. For llama.cpp rows it is the file; for edgellm
rows it is the source GGUF with its linear tensors (and the lm_head, when a plan quantizes it) replaced by
edgellm's as stored: packed codes + fp16 scales and minima, as GGUF stores them (the quantizers choose
fp16 values, so this is exact). The tied embedding/lm_head is counted once on both sides.
"bits/weight" is the linear layers' bytes x 8 over the source model's linear weights. A bits/weight
*budget* (--budgets-bpw) is the whole file a model would have with its linears at that many bits/weight and
every other tensor as the source stores it: the allocator may spend it elsewhere (a 4-bit head frees bytes
the linears then use), so a plan's own bits/weight can exceed its budget's label. The ONNX export is
bigger than either ("export MB": fp32 scales, and the embedding stored twice for speed).
Speed: measured decode ms/token on ONNX Runtime (this machine, --threads), and the cost table's prediction.

Each row is cached under ~/.cache/edgellm/pareto, keyed by what determines it (the entry, the recipe file's
text, the source model, the evaluation settings; not the commit), so a rerun computes only new rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgellm.compress.plan import CompressionPlan

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: fp16 scales/minima (block_formats.rtn_grid), quantized lm_head
EVAL_TEXT = "alice29.txt"
UNIFORM_FORMATS = ("int2", "int3", "int3-sym", "int4-sym", "int4", "int8")
SIZE_BUDGETS_BPW = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
LATENCY_BUDGETS_MS = (6.0, 6.5, 7.0)
# recipes whose budgets differ from "every size budget" (allocate passes) or "run once" (the rest)
AT_LLAMACPP_SIZES = ("allocate-size",)  # also run once at each llama.cpp type's own file size
RECIPE_BUDGETS: dict[str, dict[str, Any]] = {
    "haq-cpu-ort": {"target": "cpu-ort", "ms_per_token": LATENCY_BUDGETS_MS},
    "allocate-size-rl": {"bits_per_weight": (3.5, 4.5)},  # at 3.0 only one plan fits (all int2-g64)
}
SKIP_RECIPES = {"rtn-int4": "= the uniform int4 row", "lossless": "= the lossless row"}
SENSITIVITY_CHUNK_UNITS = 20  # units measured between saves (each chunk re-runs one base forward pass)
GROUPS = ("lossless", "uniform RTN", "GPTQ", "allocator (size)", "allocator (latency)", "RL search",
          "pruning", "recipe", "llama.cpp")


@dataclass(frozen=True)
class Entry:
    """One row to compute: `kind` "plan" (spec: plan JSON), "recipe" (spec: name, budget kind, value) or
    "llamacpp" (spec: type name)."""

    name: str
    group: str
    kind: str
    spec: tuple


def _recipe_group(recipe) -> str:
    passes = [s.name for s in recipe.passes]
    if "allocate" in passes:
        solver = next(s.params.solver for s in recipe.passes if s.name == "allocate")
        return "RL search" if solver == "rl" else "allocator (size)"
    if any(p.startswith(("prune", "wanda", "sparsegpt", "magnitude", "structured", "distill")) for p in passes):
        return "pruning"
    return "GPTQ" if "gptq" in passes else "recipe"


def entries(budgets_bpw=SIZE_BUDGETS_BPW, budgets_ms=LATENCY_BUDGETS_MS, llamacpp_types=None,
            llamacpp_mb: dict[str, float] | None = None) -> list[Entry]:
    """Every row of the table, in order. `llamacpp_mb` ({type: file MB}) adds, for AT_LLAMACPP_SIZES
    recipes, one row per llama.cpp type whose budget is that type's whole file size."""
    from edgellm.bench.llamacpp_quant import DEFAULT_TYPES
    from edgellm.compress.plan import PRESETS
    from edgellm.compress.recipe import RECIPES_DIR, load_recipe

    rows = [Entry("lossless (Q4_1 transcode)", "lossless", "plan", (json.dumps(PRESETS["lossless-transcode"].to_dict()),))]
    for fmt in UNIFORM_FORMATS:
        plan = CompressionPlan(default=fmt, name=f"rtn-{fmt}")
        rows.append(Entry(f"uniform {fmt} RTN", "uniform RTN", "plan", (json.dumps(plan.to_dict()),)))
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        name = path.stem
        if name in SKIP_RECIPES:
            continue
        try:
            recipe = load_recipe(path)
        except Exception as exc:  # a recipe another pass registry does not know yet: say so, keep going
            log.warning("recipe %s skipped: %s", name, exc)
            continue
        group = _recipe_group(recipe)
        budgets = RECIPE_BUDGETS.get(name, {})
        if "ms_per_token" in budgets:
            for ms in budgets_ms if name == "haq-cpu-ort" else budgets["ms_per_token"]:
                rows.append(Entry(f"{name} <= {ms} ms/token", "allocator (latency)", "recipe", (name, "ms", ms)))
        elif group in ("allocator (size)", "RL search"):
            for bpw in budgets.get("bits_per_weight", budgets_bpw):
                rows.append(Entry(f"{name} <= {bpw} bits/weight", group, "recipe", (name, "bpw", bpw)))
            if name in AT_LLAMACPP_SIZES:
                for t, mb in (llamacpp_mb or {}).items():
                    rows.append(Entry(f"{name} <= {t} size ({mb:.1f} MB)", group, "recipe", (name, "mb", mb)))
        else:
            rows.append(Entry(name, group, "recipe", (name, "", 0)))
    for t in llamacpp_types or DEFAULT_TYPES:
        rows.append(Entry(f"llama.cpp {t}", "llama.cpp", "llamacpp", (t,)))
    return rows


@dataclass
class Context:
    source: Path
    ids: list[int]
    window: int
    threads: int
    sensitivity_cache: Path
    linear_weights: int  # of the source model
    nonlinear_bytes: int  # source GGUF bytes that are not linear layers (embedding, norms, metadata)
    head_bytes: int = 0  # of those, the source's lm_head tensor (tied: the embedding), as stored
    progress: bool = True
    row_key: str = ""  # cache key of the row being computed


def _cache_root() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm")


def cache_key(entry: Entry, ctx: Context) -> str:
    """A row's identity: the entry, the recipe as parsed (passes, parameters, seed; not its comments), the
    source model and the evaluation settings. Not the commit: unrelated changes keep rows cached."""
    from edgellm.compress.recipe import load_recipe

    recipe = None
    if entry.kind == "recipe":
        r = load_recipe(entry.spec[0])
        recipe = {"seed": r.seed, "passes": [{"pass": p.name, **asdict(p.params)} for p in r.passes]}
    table = None
    if entry.kind == "recipe" and entry.spec[1] == "ms":  # a latency row depends on the measured cost table
        from edgellm.compress.target import load_target

        path = load_target(RECIPE_BUDGETS[entry.spec[0]]["target"]).cost_table
        table = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    data = {"v": CACHE_VERSION, "kind": entry.kind, "spec": list(entry.spec), "recipe": recipe,
            "source": [str(ctx.source), ctx.source.stat().st_size], "text": EVAL_TEXT, "tokens": len(ctx.ids),
            "window": ctx.window, "threads": ctx.threads}
    if table is not None:  # only latency rows carry it, so other rows keep their cached keys
        data["cost_table"] = table
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:20]


# ---- edgellm rows ---------------------------------------------------------------------------------------

def _ppl(backend, ctx: Context) -> float:
    from edgellm.bench.perplexity import perplexity

    return perplexity(backend, ctx.ids, window=ctx.window).ppl


def evaluate_edgellm(description, plan: CompressionPlan, ctx: Context) -> dict:
    """Sizes, reference perplexity, and (when ONNX Runtime can run it) export size, ORT perplexity,
    measured and predicted decode ms/token."""
    from edgellm.compress.rtn import head_bytes, linear_bytes, materialize, non_onnx_layers
    from edgellm.export.onnx_export import effective_description
    from edgellm.runtime.registry import create_backend

    stored, kept = materialize(description, plan)
    lin, _ = linear_bytes(stored, kept)
    head = head_bytes(stored, kept.lm_head)  # a quantized (tied) lm_head frees bytes the linears may use
    other = ctx.nonlinear_bytes - ctx.head_bytes + head
    row: dict[str, Any] = {
        "linear_bytes": lin, "bits_per_weight": 8 * lin / ctx.linear_weights, "head_bytes": head,
        "model_mb": (other + lin) / 1e6,
        "formats": _format_counts(description, plan),
    }
    eff = effective_description(stored, kept)
    row["ppl_ref"] = _ppl(create_backend("reference", eff, threads=ctx.threads), ctx)
    del eff
    bad = non_onnx_layers(stored, kept)
    if bad:
        row.update(engine="reference", ppl_engine=row["ppl_ref"],
                   note=f"not exportable: {len(bad)} layers ONNX Runtime cannot run (3-bit)")
        return row
    row.update(_onnx_measurements(stored, kept, ctx))
    return row


def _export_dir(ctx: Context) -> Path:
    """Where this row's ONNX export is kept (the final speed pass times every export side by side)."""
    return _cache_root() / "pareto" / "exports" / ctx.row_key


def _format_counts(description, plan: CompressionPlan) -> dict[str, int]:
    from edgellm.compress.rtn import linear_names

    counts: dict[str, int] = {}
    for name in linear_names(description):
        fmt = plan.format_for(name)
        if fmt == "auto":
            t = description.weights[f"{name}.weight"]
            fmt = t.blocks.source if t.qtype == "BLOCKQ" else f"auto ({t.qtype})"
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def _onnx_measurements(description, plan: CompressionPlan, ctx: Context) -> dict:
    from edgellm.compress.target import export_linears, load_target
    from edgellm.errors import ConfigError
    from edgellm.export.onnx_export import export_onnx, lowering_for
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    # stock ops: the lowering the cost table timed, so predicted and measured speak of the same graph
    art = export_onnx(description, _export_dir(ctx), plan, overwrite=True, options=lowering_for(plan, "matmulnbits"))
    out = {"engine": "onnxruntime", "export_mb": sum(p.stat().st_size for p in art.iterdir()) / 1e6,
           "export_dir": str(art)}
    out["ppl_engine"] = _ppl(create_backend("onnxruntime", load_model(art), threads=ctx.threads), ctx)
    manifest = json.loads((art / "manifest.json").read_text())
    try:
        table = load_target("cpu-ort").load_cost_table()
        formats, shapes = export_linears(description.config, manifest["layers"])
        out["predicted_ms_per_token"] = table.predict_decode_us(formats, shapes) / 1e3
    except ConfigError as exc:  # e.g. groups of 64: not in the measured cost table
        out["predicted_note"] = str(exc).split(";")[0]
    return out


def _load_source():
    from edgellm.model.loader import load_model

    return load_model()


def run_recipe_entry(entry: Entry, ctx: Context) -> dict:
    from edgellm.compress.passes import CompressState
    from edgellm.compress.pipeline import run_recipe
    from edgellm.compress.recipe import load_recipe
    from edgellm.errors import ConfigError

    name, budget_kind, value = entry.spec
    recipe = load_recipe(name)
    model = _load_source()
    state = CompressState(model=model, plan=CompressionPlan(), seed=recipe.seed, progress=ctx.progress,
                          cache_dir=ctx.sensitivity_cache)
    if budget_kind == "bpw":
        state.budget_bytes = int(value * ctx.linear_weights / 8)
    elif budget_kind == "mb":  # a whole file of `value` MB (1e6 bytes), as the llama.cpp rows count it
        state.budget_bytes = int(value * 1e6) - ctx.nonlinear_bytes
    elif budget_kind == "ms":
        _attach_latency_budget(state, RECIPE_BUDGETS[name]["target"], value)
    ensure_sensitivity(state, recipe)
    started = time.perf_counter()
    try:
        run_recipe(state, recipe)
    except ConfigError as exc:  # e.g. a budget below the smallest plan the recipe's formats allow
        return {"error": str(exc)}
    search_s = time.perf_counter() - started
    row = evaluate_edgellm(state.model, state.plan, ctx)
    row["recipe_seconds"] = search_s
    row["report"] = state.report
    return row


def _attach_latency_budget(state, target_name: str, ms: float) -> None:
    from edgellm.compress.target import load_target

    target = load_target(target_name)
    table = target.load_cost_table()
    cfg = state.model.config
    state.target = target
    state.cost_us = lambda u, f: table.cost_us(u.k, u.n, "int4" if f == "auto" else f)
    state.plan = CompressionPlan(accuracy_level=target.accuracy_level, lm_head_accuracy_level=target.lm_head_accuracy_level)
    state.budget_us = ms * 1e3 - (table.overhead_us + table.cost_us(cfg.hidden_size, cfg.vocab_size, "int8"))


def ensure_sensitivity(state, recipe) -> None:
    """Before an allocate pass: build its sensitivity table from cached tables of the same model and
    calibration (other format lists), measuring only the formats none of them holds."""
    from edgellm.compress.sensitivity import (
        SensitivityConfig,
        SensitivityTable,
        cache_key,
        calibration_ids,
        measure_sensitivity,
    )
    from edgellm.compress.units import units
    from edgellm.model.tokenizer import Tokenizer

    for spec in recipe.passes:
        if spec.name != "allocate":
            continue
        p = spec.params
        formats = [f for f in p.formats if f != "auto" and (state.target is None or state.target.supports("linear", f))]
        config = SensitivityConfig(calibration=p.calibration, tokens=p.tokens, window=p.window, formats=tuple(formats))
        path = state.cache_dir / f"sensitivity-{cache_key(state.model, config)}.json"
        if path.is_file():
            continue
        merged: dict[str, dict[str, float]] = {}
        for other in sorted(state.cache_dir.glob("sensitivity-*.json")):
            table = SensitivityTable.load(other)
            same = {k: table.config.get(k) for k in ("calibration", "tokens", "window", "grid")} == {
                "calibration": p.calibration, "tokens": p.tokens, "window": p.window, "grid": config.grid}
            if same and table.model == str(state.model.source):
                for unit, per in table.kl.items():
                    merged.setdefault(unit, {}).update({f: v for f, v in per.items() if f in formats})
        names = [u.name for u in units(state.model.config)]
        have = set.intersection(*(set(merged.get(n, {})) for n in names))
        missing = tuple(f for f in formats if f not in have)
        state.cache_dir.mkdir(parents=True, exist_ok=True)
        if missing:
            log.info("sensitivity: measuring %s (cached: %s)", ", ".join(missing), ", ".join(sorted(have)) or "none")
            ids = calibration_ids(Tokenizer(state.model.tokenizer), config)
            todo = SensitivityConfig(calibration=p.calibration, tokens=p.tokens, window=p.window, formats=missing)
            # hours on a busy 2-core machine: measured a few layers at a time, saved after each, resumable
            partial_path = path.with_name(path.stem + ".partial.json")
            partial = SensitivityTable.load(partial_path).kl if partial_path.is_file() else {}
            all_units = units(state.model.config)
            for start in range(0, len(all_units), SENSITIVITY_CHUNK_UNITS):
                chunk = [u for u in all_units[start:start + SENSITIVITY_CHUNK_UNITS]
                         if not set(missing) <= set(partial.get(u.name, {}))]
                if chunk:
                    fresh = measure_sensitivity(state.model, ids, todo, progress=state.progress, only=chunk)
                    for unit, per in fresh.kl.items():
                        partial.setdefault(unit, {}).update(per)
                    SensitivityTable(model=str(state.model.source), config=asdict(todo), kl=partial).save(partial_path)
            for unit, per in partial.items():
                merged.setdefault(unit, {}).update({f: v for f, v in per.items() if f in missing})
        SensitivityTable(model=str(state.model.source), config=asdict(config), kl=merged).save(path)


def run_plan_entry(entry: Entry, ctx: Context) -> dict:
    plan = CompressionPlan.from_dict(json.loads(entry.spec[0]))
    return evaluate_edgellm(_load_source(), plan, ctx)


# ---- llama.cpp rows -------------------------------------------------------------------------------------

def run_llamacpp_entry(entry: Entry, ctx: Context) -> dict:
    from edgellm.bench.llamacpp_quant import gguf_sizes, llamacpp_perplexity, requantize
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    path = requantize(ctx.source, entry.spec[0], threads=ctx.threads)
    sizes = gguf_sizes(path)
    row = {"file": str(path), "model_mb": sizes.file_bytes / 1e6,
           "linear_bytes": sizes.linear_bytes, "bits_per_weight": 8 * sizes.linear_bytes / ctx.linear_weights,
           "formats": sizes.tensor_types, "embedding": sizes.embedding_type, "engine": "llama.cpp"}
    row["ppl_engine"] = llamacpp_perplexity(path, ctx.ids, window=ctx.window, threads=ctx.threads)
    row["ppl_ref"] = _ppl(create_backend("reference", load_model(path), threads=ctx.threads), ctx)
    return row


RUNNERS: dict[str, Callable[[Entry, Context], dict]] = {
    "plan": run_plan_entry, "recipe": run_recipe_entry, "llamacpp": run_llamacpp_entry}


def run_entry(entry: Entry, ctx: Context, refresh: bool = False) -> dict:
    """One row, from the cache when its inputs are unchanged."""
    ctx.row_key = cache_key(entry, ctx)
    path = _cache_root() / "pareto" / f"{ctx.row_key}.json"
    if path.is_file() and not refresh:
        row = json.loads(path.read_text())
        if "export_dir" not in row or Path(row["export_dir"], "manifest.json").is_file():
            # two entries with the same inputs (e.g. Q2_K and Q3_K_S files of one size) share one result
            return {**row, "name": entry.name, "group": entry.group}
    started = time.perf_counter()
    row = {"name": entry.name, "group": entry.group, "kind": entry.kind, "spec": list(entry.spec),
           **RUNNERS[entry.kind](entry, ctx)}
    row["eval_seconds"] = time.perf_counter() - started
    _write_atomic(path, json.dumps(row, indent=1, default=str))
    return row


def speed_pass(rows: list[dict], threads: int, rounds: int = 3) -> None:
    """Decode ms/token of every exported row, interleaved round by round (so load drifts on a shared machine
    hit all rows alike), median per row, and each row's ratio to the lossless transcode."""
    import statistics

    from edgellm.bench.decode_probe import decode_ms_per_token

    timed = [r for r in rows if r.get("export_dir") and Path(r["export_dir"], "manifest.json").is_file()]
    samples: dict[str, list[float]] = {r["name"]: [] for r in timed}
    for _ in range(rounds):
        for r in timed:
            samples[r["name"]].append(decode_ms_per_token(Path(r["export_dir"]), threads=threads, rounds=1))
    base = next((statistics.median(samples[r["name"]]) for r in timed if r["group"] == "lossless"), None)
    for r in timed:
        r["ort_ms_per_token"] = statistics.median(samples[r["name"]])
        r["ort_ms_samples"] = samples[r["name"]]
        r["ort_ms_vs_lossless"] = r["ort_ms_per_token"] / base if base else None


# ---- targets, outputs ------------------------------------------------------------------------------------

def check_targets(rows: list[dict]) -> list[dict]:
    """Issue 4's size target, for both perplexity measures. "at_type_size": the allocator run with each
    llama.cpp type's whole file size as its budget has the lower perplexity (the reading this table is
    built for). "dominates_larger": the literal reading, each allocator plan beats every llama.cpp type
    whose file is at least as large (false by construction for small plans vs Q8_0; reported, not hidden).
    "~3 bits/weight vs Q3_K_M": the plan at 3.0 bits/weight against Q3_K_M."""
    alloc = [r for r in rows if r["group"] == "allocator (size)" and "error" not in r]
    llama = {r["name"].split()[-1]: r for r in rows if r["group"] == "llama.cpp" and "error" not in r}
    checks = []
    for ppl_key in ("ppl_ref", "ppl_engine"):
        for a in alloc:
            if a["spec"][1] == "mb":
                t = a["name"].split("<= ")[1].split(" size")[0]
                if t in llama:
                    q = llama[t]
                    checks.append({"kind": "at_type_size", "ppl": ppl_key, "plan": a["name"], "type": t,
                                   "plan_mb": a["model_mb"], "type_mb": q["model_mb"], "plan_ppl": a[ppl_key],
                                   "type_ppl": q[ppl_key], "holds": a[ppl_key] < q[ppl_key]
                                   and a["model_mb"] <= q["model_mb"] + 1e-9})
                continue
            bigger = [(t, r) for t, r in llama.items() if r["model_mb"] >= a["model_mb"]]
            losses = [t for t, r in bigger if not a[ppl_key] < r[ppl_key]]
            checks.append({"kind": "dominates_larger", "ppl": ppl_key, "plan": a["name"], "plan_mb": a["model_mb"],
                           "plan_ppl": a[ppl_key], "compared": [t for t, _ in bigger], "beaten_by": losses,
                           "holds": not losses})
        at3 = [a for a in alloc if a["spec"][1] == "bpw" and abs(a["spec"][2] - 3.0) < 1e-9]
        if at3 and "Q3_K_M" in llama:
            a, q = at3[0], llama["Q3_K_M"]
            checks.append({"kind": "~3 bits/weight vs Q3_K_M", "ppl": ppl_key, "plan": a["name"],
                           "plan_mb": a["model_mb"], "plan_ppl": a[ppl_key], "type_mb": q["model_mb"],
                           "type_ppl": q[ppl_key], "holds": a[ppl_key] < q[ppl_key]})
    return checks


def frontier_vs_llamacpp(rows: list[dict]) -> list[dict]:
    """The converse view: for each llama.cpp type, the best allocator plan (and the best edgellm row of any
    method) whose file is no larger, and whether it has the lower perplexity (reference, both sides)."""
    ok = [r for r in rows if "error" not in r]
    out = []
    for q in (r for r in ok if r["group"] == "llama.cpp"):
        entry = {"type": q["name"].split()[-1], "type_mb": q["model_mb"], "type_ppl": q["ppl_ref"]}
        for label, pool in (("allocator", [r for r in ok if r["group"] == "allocator (size)"]),
                            ("edgellm", [r for r in ok if r["group"] != "llama.cpp"])):
            fits = [r for r in pool if r["model_mb"] <= q["model_mb"]]
            best = min(fits, key=lambda r: r["ppl_ref"]) if fits else None
            entry[label] = None if best is None else {"name": best["name"], "mb": best["model_mb"],
                                                      "ppl": best["ppl_ref"], "lower": best["ppl_ref"] < q["ppl_ref"]}
        out.append(entry)
    return out


def _ms(r: dict):
    return r.get("ort_ms_per_token", r.get("ort_ms_per_token_at_eval"))


def rl_vs_milp(rows: list[dict]) -> list[dict]:
    """RL-search rows beside the MILP rows at the same budget: predicted loss, search time, perplexity."""
    milp = {r["spec"][2]: r for r in rows if r["group"] == "allocator (size)" and "error" not in r}
    out = []
    for r in rows:
        if r["group"] != "RL search" or "error" in r or r["spec"][2] not in milp:
            continue
        m = milp[r["spec"][2]]
        rl_kl, milp_kl = r["report"]["allocate"]["predicted_kl"], m["report"]["allocate"]["predicted_kl"]
        out.append({"bits_per_weight": r["spec"][2], "milp_predicted_kl": milp_kl, "rl_predicted_kl": rl_kl,
                    "gap": rl_kl / milp_kl - 1 if milp_kl > 0 else None, "rl_never_better": rl_kl >= milp_kl * (1 - 1e-9),
                    "milp_seconds": m["recipe_seconds"], "rl_seconds": r["recipe_seconds"],
                    "milp_ppl_ref": m["ppl_ref"], "rl_ppl_ref": r["ppl_ref"]})
    return out


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [(f"SmolLM2-135M-Instruct (source: {Path(result['source']).name}), perplexity on {EVAL_TEXT} "
             f"(first {result['ppl_tokens']} tokens, windows of {result['window']}), {result['threads']} threads, "
             f"{result['machine']['cpu']} ({result['machine']['cpus']} cores, shared), commit {result['commit']}."), "",
             ("| row | group | model MB | bits/weight | ppl ref | ppl engine | engine | ORT ms/token "
             "| vs lossless | predicted ms/token | export MB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['group']} | - | - | - | - | - | - | - | - | - |")
            continue
        lines.append(f"| {r['name']} | {r['group']} | {r['model_mb']:.1f} | "
                     f"{r['bits_per_weight']:.2f} | {r['ppl_ref']:.3f} | {r['ppl_engine']:.3f} | {r['engine']} | "
                     f"{_fmt(_ms(r))} | {_fmt(r.get('ort_ms_vs_lossless'))} | {_fmt(r.get('predicted_ms_per_token'))} | "
                     f"{_fmt(r.get('export_mb'), '.1f')} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Rows without a result:"] + [f"- {r['name']}: {r['error']}" for r in errors]
    if result["rl_vs_milp"]:
        lines += ["", "RL search (HAQ DDPG) vs the exact MILP on the same sensitivity table and budget:", "",
                  "| bits/weight | MILP predicted KL | RL predicted KL | gap | MILP s | RL s | MILP ppl ref | RL ppl ref |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in result["rl_vs_milp"]:
            lines.append(f"| {c['bits_per_weight']} | {c['milp_predicted_kl']:.4f} | {c['rl_predicted_kl']:.4f} | "
                         f"{_fmt(c['gap'] * 100 if c['gap'] is not None else None, '.1f')} % | "
                         f"{c['milp_seconds']:.1f} | {c['rl_seconds']:.1f} | {c['milp_ppl_ref']:.3f} | {c['rl_ppl_ref']:.3f} |")
    targets = result["targets"]
    lines += ["", ("Issue 4 size target, at each llama.cpp type's file size (allocate-size with that whole file size "
              "as its budget):"), "", "| ppl | llama.cpp type | type MB | type ppl | plan MB | plan ppl | holds |",
              "|---|---|---|---|---|---|---|"]
    for c in (c for c in targets if c["kind"] == "at_type_size"):
        lines.append(f"| {c['ppl']} | {c['type']} | {c['type_mb']:.1f} | {c['type_ppl']:.3f} | {c['plan_mb']:.1f} | "
                     f"{c['plan_ppl']:.3f} | {'yes' if c['holds'] else 'no'} |")
    lines += ["", ("~3 bits/weight vs Q3_K_M, and the literal reading (each bits/weight plan vs every llama.cpp type "
              "whose file is at least as large):"), "",
              "| ppl | plan | plan MB | plan ppl | compared | beaten by | holds |", "|---|---|---|---|---|---|---|"]
    for c in (c for c in targets if c["kind"] != "at_type_size"):
        compared = ", ".join(c.get("compared", [])) or "(none)" if c["kind"] == "dominates_larger" else \
            f"Q3_K_M ({c['type_mb']:.1f} MB, {c['type_ppl']:.3f})"
        beaten = ", ".join(c.get("beaten_by", [])) or "-" if c["kind"] == "dominates_larger" else \
            ("-" if c["holds"] else "Q3_K_M")
        lines.append(f"| {c['ppl']} | {c['plan']} | {c['plan_mb']:.1f} | {c['plan_ppl']:.3f} | {compared} | {beaten} | "
                     f"{'yes' if c['holds'] else 'no'} |")
    lines += ["", "Converse view: for each llama.cpp type, the best plan whose file is no larger (ppl ref on both sides):",
              "", ("| llama.cpp type | MB | ppl ref | best allocator plan <= its size | ppl ref | lower? "
              "| best edgellm row <= its size | ppl ref | lower? |"), "|---|---|---|---|---|---|---|---|---|"]
    for c in result.get("frontier_vs_llamacpp", []):
        cells = []
        for label in ("allocator", "edgellm"):
            b = c[label]
            cells += ["(none)", "-", "-"] if b is None else [f"{b['name']} ({b['mb']:.1f} MB)", f"{b['ppl']:.3f}",
                                                              "yes" if b["lower"] else "no"]
        lines.append(f"| {c['type']} | {c['type_mb']:.1f} | {c['type_ppl']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rows at a llama.cpp type's size repeat a point of the bits/weight sweep or of lossless; the tables show them
    ok = [r for r in rows if "error" not in r and r.get("spec", [None, None])[1:2] != ["mb"]]
    best = min(r["ppl_ref"] for r in ok)
    shown = [r for r in ok if r["ppl_ref"] < 4 * best]  # collapsed plans (e.g. uniform 2-bit) would flatten the rest
    hidden = [r["name"] for r in ok if r not in shown]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.6))
    colours = dict(zip(GROUPS, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2, strict=False))
    markers = dict(zip(GROUPS, "*osDPv^Xh", strict=False))
    for ax, key, label, ppl_key in (
            (axes[0], "model_mb", "model MB (GGUF-style file, fp16 scales, tied embedding counted once)", "ppl_ref"),
            (axes[1], "ort_ms", "measured decode ms/token (ONNX Runtime)", "ppl_engine")):
        labelled: set[tuple[float, float]] = set()
        for group in GROUPS:
            pts = [(r, _ms(r) if key == "ort_ms" else r[key]) for r in shown if r["group"] == group]
            pts = [(r, x) for r, x in pts if x is not None]
            if not pts:
                continue
            ax.scatter([x for _, x in pts], [r[ppl_key] for r, _ in pts], s=90 if group == "lossless" else 50,
                       marker=markers[group], color=colours[group], label=group, zorder=3 if group == "lossless" else 2)
            for r, x in pts:  # one label per point: rows with equal results (same plan) share it
                at = (round(x, 1), round(r[ppl_key], 2))
                if at in labelled:
                    continue
                labelled.add(at)
                short = r["name"].replace("llama.cpp ", "").replace(" bits/weight", " b/w").replace("uniform ", "")
                ax.annotate(short, (x, r[ppl_key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"perplexity, {EVAL_TEXT} ({'reference' if ppl_key == 'ppl_ref' else 'same engine'})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="upper right")
    title = "SmolLM2-135M: quality vs size (left) and vs decode speed on ONNX Runtime (right)"
    if hidden:
        title += f"\nnot shown (ppl > 4x best): {', '.join(hidden)}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "system": platform.system(), "python": platform.python_version()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def context(ppl_tokens: int, window: int, threads: int) -> Context:
    from edgellm.bench.llamacpp_quant import gguf_sizes
    from edgellm.corpus import canterbury_path
    from edgellm.model.tokenizer import Tokenizer

    model = _load_source()
    ids = Tokenizer(model.tokenizer).encode(canterbury_path(EVAL_TEXT).read_bytes().decode("utf-8"))[:ppl_tokens]
    sizes = gguf_sizes(model.source)
    from edgellm.compress.rtn import head_bytes

    return Context(source=Path(model.source), ids=ids, window=window, threads=threads,
                   sensitivity_cache=_cache_root() / "sensitivity", linear_weights=sizes.linear_weights,
                   nonlinear_bytes=sizes.file_bytes - sizes.linear_bytes, head_bytes=head_bytes(model, "auto"))


def _llamacpp_sizes(ctx: Context) -> dict[str, float]:
    """{type: file MB} of llama.cpp's requantized files (seconds each; cached files are reused)."""
    from edgellm.bench.llamacpp_quant import DEFAULT_TYPES, gguf_sizes, requantize

    return {t: gguf_sizes(requantize(ctx.source, t, threads=ctx.threads)).file_bytes / 1e6 for t in DEFAULT_TYPES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/pareto", help="output prefix (writes .json, .md, .png)")
    p.add_argument("--budgets-bpw", default=",".join(map(str, SIZE_BUDGETS_BPW)),
                   help="size budgets for allocate recipes: the file of the source with its linear layers at this many "
                        "bits/weight (the allocator may move bytes between head and linears), comma-separated")
    p.add_argument("--budgets-ms", default=",".join(map(str, LATENCY_BUDGETS_MS)),
                   help="latency budgets for haq-cpu-ort, ms/token on cpu-ort, comma-separated")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="compute only rows whose name contains this (others from cache)")
    p.add_argument("--skip", default=None, help="comma-separated name parts of rows not to compute (cached ones stay)")
    p.add_argument("--refresh", action="store_true", help="recompute rows even when cached")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from an existing OUT.json")
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved decode timing rounds per export")
    p.add_argument("--no-speed-pass", action="store_true", help="skip the final side-by-side decode timing")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out)
    if a.replot:
        data = json.loads(Path(f"{out}.json").read_text())
        plot(data["rows"] if isinstance(data, dict) else data, Path(f"{out}.png"))
        return 0
    from tqdm import tqdm

    ctx = context(a.ppl_tokens, a.window, a.threads)
    todo = entries(tuple(float(x) for x in a.budgets_bpw.split(",") if x),
                   tuple(float(x) for x in a.budgets_ms.split(",") if x), llamacpp_mb=_llamacpp_sizes(ctx))
    started = time.time()
    rows = []
    bar = tqdm(todo, desc="pareto", unit="row")
    for entry in bar:
        bar.set_postfix_str(entry.name)
        if (a.only and a.only not in entry.name) or any(x and x in entry.name for x in (a.skip or "").split(",")):
            path = _cache_root() / "pareto" / f"{cache_key(entry, ctx)}.json"
            if path.is_file():
                rows.append({**json.loads(path.read_text()), "name": entry.name, "group": entry.group})
            continue
        row = run_entry(entry, ctx, refresh=a.refresh)
        rows.append(row)
        if "error" in row:
            log.info("%s: %s", entry.name, row["error"])
        else:
            log.info("%s: %.1f MB, %.2f bits/weight, ppl ref %.3f, %s %.3f", entry.name, row["model_mb"],
                     row["bits_per_weight"], row["ppl_ref"], row["engine"], row["ppl_engine"])
    if not a.no_speed_pass:
        log.info("speed pass: decode ms/token of %d exports, %d interleaved rounds",
                 sum(1 for r in rows if r.get("export_dir")), a.speed_rounds)
        speed_pass(rows, a.threads, a.speed_rounds)
    result = {"source": str(ctx.source), "ppl_tokens": len(ctx.ids), "window": ctx.window, "threads": ctx.threads,
              "machine": _machine(), "commit": _commit(), "command": "python -m edgellm.bench.pareto " + " ".join(argv or sys.argv[1:]),
              "wall_seconds": time.time() - started, "rows": rows}
    result["rl_vs_milp"] = rl_vs_milp(rows)
    result["targets"] = check_targets(rows)
    result["frontier_vs_llamacpp"] = frontier_vs_llamacpp(rows)
    _write_atomic(Path(f"{out}.json"), json.dumps(result, indent=1, default=str))
    text = markdown(result)
    _write_atomic(Path(f"{out}.md"), text)
    plot(rows, Path(f"{out}.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
