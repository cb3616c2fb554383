"""`edgellm profile`: measure a target's cost table on its real backend (here ONNX Runtime CPU).

Each (K, N, format, M) is timed on the linear exactly as the exporter lowers it (onnx_graph.linear, so
an asymmetric format includes its block-offset correction), with the target's threads and
accuracy_level, seeded random weights quantized by quantize_rtn, in its own ONNX Runtime session run
through IO binding as the ORT backend runs its sessions:

    x (1, M, K) ──► linear(W_1) ──► y_1        C copies of one linear, each with its own weights, so that
            ├─────► linear(W_2) ──► y_2        one run streams as many weight bytes as a decode token of
            └─────► linear(W_C) ──► y_C        the model stored in that format does (the working set)

cost = (run time - an empty session call on the same input) / C, median and 10th/90th percentiles
over `repeats` runs split across `passes` passes through every entry. Why C copies: in a real decode
each layer's weights come from memory, not cache. On the 2-core EPYC VM (32 MB L3) a lone linear with
hot weights costs 2-4x less than one of C (fp32 576 x 3072: 58 vs 150 us); a table of lone linears
predicted an fp32-linear export's decode at 8.9 ms/token against 14.4-17 measured, and a fixed 64 MB
working set still at 13.6, while fp32's real working set is ~440 MB, hence the per-format working set.

overhead_us is what a real decode token costs beyond its linears: the model is exported (lossless
transcode), decoded token by token on the same backend, and the table's sum for its linears
subtracted (attention, norms, activation, runtime).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
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
WORKING_SET_MB = 64.0  # for shapes not taken from a model: past the last-level cache (32 MB here, 2 MB on a Pi 5)
MAX_COPIES = 512
# stored bytes per weight of each format (block_formats: a float32 scale per 32 weights, plus a float32
# offset per 32 for the asymmetric ones)
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1 + 4 / 32, "int4": 0.5 + 8 / 32, "int4-sym": 0.5 + 4 / 32,
                    "int2": 0.25 + 8 / 32}
MAX_COPIES_PREFILL = 4  # at M=128 each weight is reused 128 times per run: cache residency hardly matters
Shapes = Mapping[str, tuple[int, int]] | Sequence[tuple[int, int]]


def default_shapes(model: str | Path | None = None) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear role of a model (default: the default model), from its config alone."""
    from edgellm.model.loader import load_model

    return linear_shapes(load_model(model).config)


def model_working_sets_mb(model: str | Path | None = None) -> dict[str, float]:
    """Per format: MB of linear weights one decode token streams when every block linear has that format."""
    from edgellm.model.loader import load_model

    cfg = load_model(model).config
    per_layer = sum(k * n for role, (k, n) in linear_shapes(cfg).items() if role != "lm_head")
    return {fmt: cfg.n_layers * per_layer * b / 2**20 for fmt, b in BYTES_PER_WEIGHT.items()}


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


class _Weights:
    """Seeded random (N, K) weights per shape and their quantized forms; holds one shape at a time."""

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None
        self.by_format: dict[str, Any] = {}

    def get(self, k: int, n: int, fmt: str):
        from edgellm.export.block_formats import quantize_rtn

        if self.shape != (k, n):  # the lm_head's float weights alone are ~113 MB
            rng = np.random.default_rng([k, n])
            self.shape, self.by_format = (k, n), {"fp32": rng.standard_normal((n, k), dtype=np.float32) * WEIGHT_STD}
        if fmt not in self.by_format:
            bits, symmetric = RTN_FORMATS[fmt]
            self.by_format[fmt] = quantize_rtn(self.by_format["fp32"], bits, BLOCK_SIZE, symmetric=symmetric)
        return self.by_format[fmt]


def n_copies(weight_bytes: int, m: int, working_set_mb: float) -> int:
    """Copies of a linear per timed run so that their weights reach `working_set_mb` (1 when <= 0).

    A weight of WORKING_SET_MB or more (the lm_head in fp32) already streams from memory: one copy.
    """
    if working_set_mb <= 0 or weight_bytes >= WORKING_SET_MB * 2**20:
        return 1
    cap = MAX_COPIES if m == 1 else MAX_COPIES_PREFILL
    return max(1, min(cap, math.ceil(working_set_mb * 2**20 / weight_bytes)))


def _variant(weight, c: int):
    """Copy c of a weight with different bytes (rolled by c elements), same format and statistics."""
    if c == 0:
        return weight
    if isinstance(weight, np.ndarray):
        return np.roll(weight.ravel(), c).reshape(weight.shape)
    offsets = None if weight.block_offsets is None else np.roll(weight.block_offsets.ravel(), c).reshape(
        weight.block_offsets.shape)
    # GGUF blocks roll by whole blocks, so every copy is valid blocks of the same format
    gguf = None if weight.gguf is None else np.roll(weight.gguf.ravel(), c * (weight.gguf.shape[1] // (weight.k // 32))
                                                    ).reshape(weight.gguf.shape)
    return replace(weight, packed=np.roll(weight.packed.ravel(), c).reshape(weight.packed.shape),
                   scales=np.roll(weight.scales.ravel(), c).reshape(weight.scales.shape), block_offsets=offsets,
                   gguf=gguf)


# x (M, K) ─► linear(W_c, format) ─► y_c (M, N), c = 0..C-1   (the exporter's lowering on its 2-D token rows,
#                                                               offsets included)
def _linear_graph(k: int, n: int, weight, copies: int, accuracy_level: int) -> tuple[Any, list[tuple[str, int]]]:
    from edgellm.export.onnx_builder import FLOAT, GraphBuilder
    from edgellm.export.onnx_graph import OPSET, linear

    b = GraphBuilder()
    x = b.add_input("x", FLOAT, ["m", k])
    outputs = []
    for c in range(copies):
        y = linear(b, x, _variant(weight, c), f"linear{c}", accuracy_level)
        b.add_output(y, FLOAT, ["m", n])
        outputs.append((y, n))
    return b.model("edgellm_linear_profile", OPSET), outputs


def _identity_graph(k: int) -> tuple[Any, list[tuple[str, int]]]:
    from edgellm.export.onnx_builder import FLOAT, GraphBuilder
    from edgellm.export.onnx_graph import OPSET

    b = GraphBuilder()
    x = b.add_input("x", FLOAT, ["m", k])
    y = b.op1("Identity", [x], name="y")
    b.add_output(y, FLOAT, ["m", k])
    return b.model("edgellm_call_overhead", OPSET), [(y, k)]


class _Runner:
    """One graph in its own session, bound through IO binding to an input (M, K) and its outputs."""

    def __init__(self, model, outputs: list[tuple[str, int]], threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.outputs = outputs

    def time_us(self, m: int, k: int, runs: int, warmup: int) -> list[float]:
        """Microseconds of each of `runs` timed runs after `warmup` untimed ones."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
        for name, n in self.outputs:
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_shape_and_type((m, n), np.float32,
                                                                                         "cpu", 0))
        for _ in range(warmup):
            self.session.run_with_iobinding(binding)
        samples = []
        for _ in range(runs):
            start = time.perf_counter_ns()
            self.session.run_with_iobinding(binding)
            samples.append((time.perf_counter_ns() - start) / 1e3)
        return samples


def _entry(samples: list[float], call_us: float, copies: int) -> CostEntry:
    p10, p50, p90 = (np.percentile(np.asarray(samples), [10, 50, 90]) - call_us) / copies
    floor = 0.01  # a linear never costs nothing; keeps predictions and ratios positive
    return CostEntry(max(float(p50), floor), max(float(p10), floor), max(float(p90), floor))


def _working_sets(from_model: bool, model: str | Path | None, working_set_mb: float | None) -> dict[str, float]:
    if working_set_mb is not None:
        return dict.fromkeys(BYTES_PER_WEIGHT, working_set_mb)
    return model_working_sets_mb(model) if from_model else dict.fromkeys(BYTES_PER_WEIGHT, WORKING_SET_MB)


def profile_target(target: Target, shapes: Shapes | None = None, formats: Sequence[str] | None = None,
                   threads: int | None = None, repeats: int = 50, progress: bool = True, prefill: bool = False,
                   overhead: bool = True, model: str | Path | None = None, passes: int = 3,
                   working_set_mb: float | None = None) -> CostTable:
    """Time every (shape, format) on ONNX Runtime CPU and return the target's cost table.

    shapes: {role: (K, N)} (role "lm_head" uses the target's lm_head formats) or a list of (K, N);
    default: the linears of `model` (default: the default model). formats: default the target's per
    layer type. prefill: also M=128. overhead: also measure overhead_us on `model`, exported.
    passes: the `repeats` runs of each entry are split over passes through all entries, each with fresh
    sessions, so a burst of load on a shared machine spreads over every entry. working_set_mb: weights
    streamed per run (module docstring); None: per format, what the model streams per decode token when
    shapes come from it, else WORKING_SET_MB; 0 times one lone linear. One session lives at a time: an
    idle session's thread pool spins after each run and slowed the next session up to 8x when interleaved.
    """
    import onnxruntime as ort
    from tqdm import tqdm

    from edgellm.bench.speed import machine_tag

    if target.backend != "onnxruntime":
        raise ConfigError(f"target {target.name}: profiling runs on onnxruntime, not {target.backend!r}")
    threads = threads or target.threads
    if min(threads, repeats, passes) < 1:
        raise ConfigError(f"threads, repeats and passes must be >= 1, found {threads}, {repeats}, {passes}")
    passes = min(passes, repeats)
    working_sets = _working_sets(shapes is None, model, working_set_mb)
    shapes = default_shapes(model) if shapes is None else shapes
    jobs = sorted(plan_jobs(target, shapes, formats, (1, PREFILL_M) if prefill else (1,)))
    roles = {role: tuple(s) for role, s in shapes.items()} if isinstance(shapes, Mapping) else {}
    samples: dict[tuple, list[float]] = {}  # ("call", K, M) or a CostKey -> run times
    copies: dict[CostKey, int] = {}
    bar = tqdm(total=len(jobs) * passes, desc=f"profile {target.name}", unit="linear", file=sys.stderr,
               disable=not progress)
    for i in range(passes):
        runs = repeats // passes + (i < repeats % passes)
        for k, m in sorted({(k, m) for k, _, _, m in jobs}):
            runner = _Runner(*_identity_graph(k), threads)
            samples.setdefault(("call", k, m), []).extend(runner.time_us(m, k, runs, max(3, runs // 5)))
            del runner
        weights = _Weights()
        for key in jobs:
            k, n, fmt, m = key
            bar.set_postfix_str(f"{k}x{n} {fmt} M={m}")
            weight = weights.get(k, n, fmt)
            copies[key] = n_copies(weight.nbytes, m, working_sets[fmt])  # ndarray or BlockQuantized
            level = target.lm_head_accuracy_level if (k, n) == roles.get("lm_head") else target.accuracy_level
            runner = _Runner(*_linear_graph(k, n, weight, copies[key], level), threads)
            samples.setdefault(key, []).extend(runner.time_us(m, k, runs, max(3, runs // 5)))
            del runner  # its thread pool must not spin beside the next session
            bar.update()
    bar.close()
    call_us = {key[1:]: statistics.median(v) for key, v in samples.items() if key[0] == "call"}  # (K, M)
    entries = {key: _entry(samples[key], call_us[(key[0], key[3])], copies[key]) for key in jobs}
    table = CostTable(
        target=target.name, entries=entries, machine=machine_tag(), threads=threads, ort_version=ort.__version__,
        accuracy_level=target.accuracy_level, repeats=repeats, estimated=False,
        source=f"measured by edgellm profile: copies of one linear per ONNX Runtime session streaming a "
               f"decode token's worth of weights, {repeats} runs over {passes} passes, minus an empty session call",
        extra={"working_set_mb": {f: round(v, 1) for f, v in working_sets.items()},
               "call_overhead_us": {f"K={k},M={m}": round(v, 3) for (k, m), v in sorted(call_us.items())},
               "copies": {f"{k}x{n} {f} M={m}": c for (k, n, f, m), c in sorted(copies.items())},
               "shapes": {role: list(s) for role, s in roles.items()}},
    )
    if overhead:
        table = measure_overhead(table, threads, model=model)
    return table


def measure_overhead(table: CostTable, threads: int, n_prompt: int = 64, n_decode: int = 64,
                     model: str | Path | None = None) -> CostTable:
    """Set overhead_us = a model's measured decode us/token - the table's sum for its linears.

    The model (default: the default model) is exported with the default plan (lossless transcode) in
    stock ONNX Runtime ops, the lowering the table's linears were timed in, to a temporary directory and
    decoded on the ONNX Runtime backend: `n_prompt` tokens prefilled, then the median of `n_decode`
    single-token forwards.
    """
    from edgellm.compress.plan import CompressionPlan
    from edgellm.export.onnx_export import export_onnx, lowering_for
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    with tempfile.TemporaryDirectory(prefix="edgellm-profile-") as tmp:
        stock = lowering_for(CompressionPlan(), "matmulnbits")  # plan: lossless transcode
        export = load_model(export_onnx(load_model(model), Path(tmp) / "export", options=stock))
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
    p.add_argument("--working-set-mb", type=float, default=None,
                   help="weights streamed per timed run (default: per format, what the default model streams "
                        "per decode token in that format; 0 times a lone linear with its weights hot in cache)")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip overhead_us (exporting and decoding the default model, ~10 s)")
    return p


def profile_main(args: argparse.Namespace, write: Callable[[str], Any] = print) -> int:
    """Handler of `edgellm profile`: measure, save atomically, print the table."""
    target = load_target(args.target)
    check_machine(target)
    out = Path(args.output) if args.output else target.cost_table
    table = profile_target(target, threads=args.threads, repeats=args.repeats, progress=True,
                           prefill=args.prefill, overhead=not args.no_overhead, working_set_mb=args.working_set_mb)
    table.save(out)
    write(format_table(table))
    write(f"wrote {out}")
    return 0
