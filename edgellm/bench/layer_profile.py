"""`edgellm profile`: measure a target's cost table on its real backend (here ONNX Runtime CPU).

Each (K, N, format, M) is one linear lowered exactly as the exporter lowers it (onnx_graph.linear, so
an asymmetric format includes its block-offset correction), in its own ONNX Runtime session with the
target's threads and accuracy_level, seeded random weights quantized by quantize_rtn. Runs go through
IO binding as the ORT backend's do; after a warm-up, each of `repeats` runs is timed on its own and the
median, 10th and 90th percentiles are kept, minus the cost of an empty session call (an Identity graph
on the same input), which is recorded as `call_overhead_us`.

overhead_us is what a real decode token costs beyond its linears: the default model is exported,
decoded token by token on the same backend, and the table's sum for that export's linears subtracted.
A lone linear runs with its weights warm in cache and is one session call, not one node among ~300.
Checked once on the 2-core EPYC VM: 13-400 copies of a linear in one graph (weights past the 32 MB L3)
cost the same or up to ~40 % less per linear than a lone one, so cache warmth does not make this table
optimistic there; what a full graph adds per node (scheduling, thread-pool wake-ups) lands in
overhead_us, which is a constant for a fixed model because every plan runs the same number of linears.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.compress.plan import RTN_FORMATS
from edgellm.compress.target import (
    STORAGE_FORMATS,
    CostEntry,
    CostKey,
    CostTable,
    Target,
    check_machine,
    export_linears,
    linear_shapes,
    load_target,
    target_names,
)
from edgellm.errors import ConfigError

log = logging.getLogger(__name__)
BLOCK_SIZE = 32
PREFILL_M = 128
WEIGHT_STD = 0.02  # roughly a trained linear's scale; timings do not depend on it
Shapes = Mapping[str, tuple[int, int]] | Sequence[tuple[int, int]]


def default_shapes(model: str | Path | None = None) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear role of a model (default: the default model), from its config alone."""
    from edgellm.model.loader import load_model

    return linear_shapes(load_model(model).config)


def _layer_type(role: str) -> str:
    return "lm_head" if role == "lm_head" else "linear"


def plan_jobs(target: Target, shapes: Shapes, formats: Sequence[str] | None, ms: Sequence[int]) -> list[CostKey]:
    """Distinct (K, N, format, M) to time: each role's formats are the target's for its layer type."""
    roles = dict(shapes) if isinstance(shapes, Mapping) else {f"{k}x{n}": (k, n) for k, n in shapes}
    jobs: dict[CostKey, None] = {}
    for role, (k, n) in roles.items():
        if k % BLOCK_SIZE:
            raise ConfigError(f"shape {role}: K={k} is not a multiple of the block size {BLOCK_SIZE}")
        supported = target.formats[_layer_type(role)]
        chosen = supported if formats is None else tuple(formats)
        bad = [f for f in chosen if f not in supported]
        if bad:
            raise ConfigError(f"target {target.name} does not run {', '.join(bad)} for {_layer_type(role)} "
                              f"layers; valid: {', '.join(supported)}")
        for fmt in chosen:
            for m in ms:
                jobs[(k, n, fmt, m)] = None
    return list(jobs)


def _weight(k: int, n: int, fmt: str, cache: dict[tuple[int, int], np.ndarray]):
    from edgellm.export.block_formats import quantize_rtn

    if (k, n) not in cache:
        cache.clear()  # one shape at a time: the lm_head's float weights alone are ~113 MB
        rng = np.random.default_rng([k, n])
        cache[(k, n)] = (rng.standard_normal((n, k), dtype=np.float32) * WEIGHT_STD)  # (N, K)
    w = cache[(k, n)]
    if fmt == "fp32":
        return w
    bits, symmetric = RTN_FORMATS[fmt]
    return quantize_rtn(w, bits, BLOCK_SIZE, symmetric=symmetric)


# x (1, M, K) ─► linear(W, format) ─► y (1, M, N)       (the exporter's own lowering, offsets included)
def _linear_graph(k: int, n: int, weight, accuracy_level: int) -> tuple[Any, str]:
    from edgellm.export.onnx_builder import FLOAT, GraphBuilder
    from edgellm.export.onnx_graph import OPSET, linear

    b = GraphBuilder()
    x = b.add_input("x", FLOAT, [1, "m", k])
    y = linear(b, x, weight, "linear", accuracy_level)
    b.add_output(y, FLOAT, [1, "m", n])
    return b.model("edgellm_linear_profile", OPSET), y


def _identity_graph(k: int) -> tuple[Any, str]:
    from edgellm.export.onnx_builder import FLOAT, GraphBuilder
    from edgellm.export.onnx_graph import OPSET

    b = GraphBuilder()
    x = b.add_input("x", FLOAT, [1, "m", k])
    y = b.op1("Identity", [x], name="y")
    b.add_output(y, FLOAT, [1, "m", k])
    return b.model("edgellm_call_overhead", OPSET), y


class _Runner:
    """One graph in its own session, bound through IO binding to a fixed input (1, M, K) and output."""

    def __init__(self, model, out_name: str, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.out_name = out_name
        self.bindings: dict[int, Any] = {}

    def bind(self, m: int, k: int, n: int) -> None:
        import onnxruntime as ort

        x = np.random.default_rng(1).standard_normal((1, m, k), dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
        binding.bind_ortvalue_output(self.out_name, ort.OrtValue.ortvalue_from_shape_and_type((1, m, n), np.float32,
                                                                                              "cpu", 0))
        self.bindings[m] = binding

    def time_us(self, m: int, runs: int, warmup: int = 2) -> list[float]:
        """Microseconds of each of `runs` timed runs after `warmup` untimed ones."""
        binding = self.bindings[m]
        for _ in range(warmup):
            self.session.run_with_iobinding(binding)
        samples = []
        for _ in range(runs):
            start = time.perf_counter_ns()
            self.session.run_with_iobinding(binding)
            samples.append((time.perf_counter_ns() - start) / 1e3)
        return samples


def _entry(samples: list[float], call_us: float) -> CostEntry:
    p10, p50, p90 = np.percentile(np.asarray(samples) - call_us, [10, 50, 90])
    floor = 0.01  # a linear never costs nothing; keeps predictions and ratios positive
    return CostEntry(max(float(p50), floor), max(float(p10), floor), max(float(p90), floor))


def profile_target(target: Target, shapes: Shapes | None = None, formats: Sequence[str] | None = None,
                   threads: int | None = None, repeats: int = 50, progress: bool = True, prefill: bool = False,
                   overhead: bool = True, rounds: int = 5, model: str | Path | None = None) -> CostTable:
    """Time every (shape, format) on ONNX Runtime CPU and return the target's cost table.

    shapes: {role: (K, N)} (role "lm_head" uses the target's lm_head formats) or a list of (K, N);
    default: the linears of `model` (default: the default model). formats: default the target's per
    layer type. prefill: also M=128. overhead: also measure overhead_us on `model`, exported.
    rounds: the `repeats` runs of each entry are split into interleaved rounds, so that a burst of
    load on a shared machine spreads over all entries instead of skewing one.
    """
    import onnxruntime as ort
    from tqdm import tqdm

    from edgellm.bench.speed import machine_tag

    if target.backend != "onnxruntime":
        raise ConfigError(f"target {target.name}: profiling runs on onnxruntime, not {target.backend!r}")
    threads = threads or target.threads
    if threads < 1 or repeats < 1 or rounds < 1:
        raise ConfigError(f"threads, repeats and rounds must be >= 1, found {threads}, {repeats}, {rounds}")
    shapes = default_shapes(model) if shapes is None else shapes
    ms = (1, PREFILL_M) if prefill else (1,)
    jobs = sorted(plan_jobs(target, shapes, formats, ms), key=lambda j: (j[0], j[1]))  # one shape's weights at a time
    roles = dict(shapes) if isinstance(shapes, Mapping) else {}
    runners = _build_runners(target, jobs, roles.get("lm_head"), threads, progress)
    rounds = min(rounds, repeats)
    per_round = [repeats // rounds + (r < repeats % rounds) for r in range(rounds)]
    samples: dict[tuple, list[float]] = {key: [] for key in runners}
    bar = tqdm(total=repeats * len(runners), desc=f"time {target.name}", unit="run", file=sys.stderr,
               disable=not progress)
    for runs in per_round:
        for key, (runner, m) in runners.items():
            samples[key] += runner.time_us(m, runs)
            bar.update(runs)
    bar.close()
    call_us = {key[1:]: statistics.median(v) for key, v in samples.items() if key[0] == "call"}  # (K, M)
    entries = {(k, n, fmt, m): _entry(samples[key], call_us[(k, m)])
               for key in samples if key[0] == "linear" for _, k, m, n, fmt in [key]}
    table = CostTable(
        target=target.name, entries=entries, machine=machine_tag(), threads=threads, ort_version=ort.__version__,
        accuracy_level=target.accuracy_level, repeats=repeats, estimated=False,
        source=f"measured by edgellm profile: one linear per ONNX Runtime session, {repeats} runs in {rounds} "
               "interleaved rounds, minus an empty session call",
        extra={"call_overhead_us": {f"K={k},M={m}": round(v, 3) for (k, m), v in sorted(call_us.items())},
               "shapes": {role: list(s) for role, s in roles.items()}},
    )
    if overhead:
        table = measure_overhead(table, threads, model=model)
    return table


def _build_runners(target: Target, jobs: list[CostKey], lm_head_shape: tuple[int, int] | None, threads: int,
                   progress: bool) -> dict[tuple, tuple[_Runner, int]]:
    """A session per (K, N, format) and per K (the empty call), bound for each M; keyed for timing."""
    from tqdm import tqdm

    runners: dict[tuple, tuple[_Runner, int]] = {}
    sessions: dict[tuple, _Runner] = {}
    weights: dict[tuple[int, int], np.ndarray] = {}
    for k, n, fmt, m in tqdm(jobs, desc=f"build {target.name}", unit="linear", file=sys.stderr, disable=not progress):
        if ("call", k) not in sessions:
            sessions[("call", k)] = _Runner(*_identity_graph(k), threads)
        if ("call", k, m) not in runners:
            sessions[("call", k)].bind(m, k, k)
            runners[("call", k, m)] = (sessions[("call", k)], m)
        if (k, n, fmt) not in sessions:
            level = target.lm_head_accuracy_level if (k, n) == lm_head_shape else target.accuracy_level
            sessions[(k, n, fmt)] = _Runner(*_linear_graph(k, n, _weight(k, n, fmt, weights), level), threads)
        sessions[(k, n, fmt)].bind(m, k, n)
        runners[("linear", k, m, n, fmt)] = (sessions[(k, n, fmt)], m)
    return runners


def measure_overhead(table: CostTable, threads: int, n_prompt: int = 64, n_decode: int = 64,
                     model: str | Path | None = None) -> CostTable:
    """Set overhead_us = a model's measured decode us/token - the table's sum for its linears.

    The model (default: the default model) is exported with the default plan (lossless transcode) to a
    temporary directory and decoded on the ONNX Runtime backend: `n_prompt` tokens prefilled, then the
    median of `n_decode` single-token forwards.
    """
    from dataclasses import replace

    from edgellm.export.onnx_export import export_onnx
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    with tempfile.TemporaryDirectory(prefix="edgellm-profile-") as tmp:
        export = load_model(export_onnx(load_model(model), Path(tmp) / "export"))  # plan: lossless transcode
        formats, shapes = export_linears(export.config, export.metadata["artifact"]["layers"])
        session = create_backend("onnxruntime", export, threads=threads).open_session(max_tokens=n_prompt + n_decode)
        ids = np.random.default_rng(0).integers(0, export.config.vocab_size, n_prompt)
        token = int(np.argmax(session.forward(ids)[-1]))
        per_token_us = []
        for _ in range(n_decode):
            start = time.perf_counter_ns()
            logits = session.forward(np.array([token]))
            per_token_us.append((time.perf_counter_ns() - start) / 1e3)
            token = int(np.argmax(logits[-1]))
    decode_us = statistics.median(per_token_us)
    linear_us = sum(table.cost_us(*shapes[name], fmt) for name, fmt in formats.items())
    counts: dict[str, int] = {}
    for fmt in formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    extra = {**table.extra, "overhead": {
        "model": export.config.name, "plan": "lossless-transcode", "decode_us_per_token": round(decode_us, 3),
        "linear_sum_us": round(linear_us, 3), "linears": counts, "n_prompt": n_prompt, "n_decode": n_decode}}
    log.info("decode %.0f us/token, linears %.0f us -> overhead %.0f us", decode_us, linear_us, decode_us - linear_us)
    return replace(table, overhead_us=decode_us - linear_us, extra=extra)


def format_table(table: CostTable, shapes: Mapping[str, tuple[int, int]] | None = None) -> str:
    """Median microseconds as text: one row per shape, one column per format (M=1, then M=128)."""
    present = {f for (_, _, f, _) in table.entries}
    formats = [f for f in STORAGE_FORMATS if f in present]
    roles = list((shapes or table.extra.get("shapes", {})).items())
    names = {tuple(s): role for role, s in roles}
    order = {tuple(s): i for i, (_, s) in enumerate(roles)}
    lines = [f"{'layer':<12} {'K x N':>13} {'M':>4} " + " ".join(f"{f:>9}" for f in formats)]
    rows = sorted({(k, n, m) for (k, n, _, m) in table.entries}, key=lambda s: (s[2], order.get(s[:2], 99), s))
    for k, n, m in rows:
        cells = [f"{table.entries[(k, n, f, m)].median_us:9.1f}" if (k, n, f, m) in table.entries else f"{'-':>9}"
                 for f in formats]
        lines.append(f"{names.get((k, n), ''):<12} {f'{k} x {n}':>13} {m:>4} " + " ".join(cells))
    if table.overhead_us is not None:
        lines.append(f"overhead_us (decode token beyond its linears): {table.overhead_us:.1f}")
    return "\n".join(lines)


# ---- CLI: `edgellm profile --target T [-o FILE]` (wired into edgellm.cli.main) -------------------------

def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `profile` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("profile", help="measure a target's cost table: microseconds per linear shape "
                                              "and storage format on its backend")
    p.add_argument("--target", required=True, metavar="T",
                   help=f"a targets/ entry ({', '.join(target_names())}) or a target .toml path")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="where to write the table JSON (default: the target's cost_table, under targets/)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: the target's)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per entry (default 50)")
    p.add_argument("--prefill", action="store_true", help=f"also time M={PREFILL_M} rows (prefill)")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip overhead_us (exporting and decoding the default model, ~10 s)")
    return p


def profile_main(args: argparse.Namespace, write: Callable[[str], Any] = print) -> int:
    """Handler of `edgellm profile`: measure, save atomically, print the table."""
    target = load_target(args.target)
    check_machine(target)
    out = Path(args.output) if args.output else target.cost_table
    table = profile_target(target, threads=args.threads, repeats=args.repeats, progress=True,
                           prefill=args.prefill, overhead=not args.no_overhead)
    table.save(out)
    write(format_table(table))
    write(f"wrote {out}")
    return 0
