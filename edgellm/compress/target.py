"""Hardware targets as data (`targets/*.toml`) and their measured per-layer cost tables.

A target says what a board can run (storage formats per layer type, threads, memory, power) and where
its cost table lives. A cost table maps one linear layer (K inputs, N outputs, storage format, M rows)
to microseconds on that target, measured by `edgellm profile` (edgellm.bench.layer_profile), plus
`overhead_us`: what one decode token costs beyond its linears (attention, norms, activation, runtime).

    predicted decode us/token = overhead_us + sum over the model's linears of cost_us(K, N, format, 1)

Tables for boards that cannot be reached are marked `estimated` and say where their numbers come from.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgellm.compress.plan import RTN_FORMATS
from edgellm.compress.units import UNIT_ROLES, unit_shapes
from edgellm.errors import ConfigError, UnknownNameError, unknown_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGETS_DIR = Path(__file__).resolve().parents[2] / "targets"
LAYER_TYPES = ("linear", "lm_head")
STORAGE_FORMATS = ("fp32", *RTN_FORMATS)  # what a cost table can hold: the formats ONNX Runtime runs by name
COST_TABLE_FORMAT = "edgellm-cost-table"
CostKey = tuple[int, int, str, int]  # (K, N, format, M)

# Every field a target file must have (dotted = inside a TOML table); optional ones carry defaults.
REQUIRED_FIELDS = (
    "name", "description", "backend", "threads", "accuracy_level", "memory_limit_mb", "cost_table",
    "formats.linear", "formats.lm_head",
    "energy.power_compute_w", "energy.power_transmit_w", "energy.power_idle_w", "energy.source",
)


@dataclass(frozen=True)
class EnergyModel:
    """Board power in each state; energy = power x time. `source` says how the numbers were obtained."""

    power_compute_w: float
    power_transmit_w: float
    power_idle_w: float
    source: str


@dataclass(frozen=True)
class Target:
    """One `targets/NAME.toml`: what the board runs and what it costs."""

    name: str
    description: str
    backend: str
    threads: int
    formats: Mapping[str, tuple[str, ...]]  # layer type ("linear", "lm_head") -> storage formats
    accuracy_level: int
    lm_head_accuracy_level: int
    memory_limit_mb: float
    energy: EnergyModel
    cost_table: Path  # resolved next to the target file
    path: Path
    arch: str | None = None  # platform.machine() the board reports (e.g. "aarch64"); None: any machine

    def supports(self, layer_type: str, fmt: str) -> bool:
        return fmt in self.formats.get(layer_type, ())

    def load_cost_table(self) -> CostTable:
        """The target's cost table (an error says how to make it when the file is missing)."""
        if not self.cost_table.is_file():
            raise ConfigError(f"target {self.name}: cost table {self.cost_table} does not exist; "
                              f"measure it with: edgellm profile --target {self.name}")
        return CostTable.load(self.cost_table)


def target_names() -> list[str]:
    """Names of the targets shipped in `targets/` (file stems)."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path) -> Target:
    """A `targets/` name such as "cpu-ort", or the path of a target TOML file."""
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if not (path.is_file() or spec.endswith(".toml") or "/" in spec):
        if spec not in target_names():
            raise unknown_name("target", spec, target_names())
        path = TARGETS_DIR / f"{spec}.toml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such target file; shipped targets: {', '.join(target_names())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return _target_from_dict(data, path)


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _target_from_dict(data: Mapping[str, Any], path: Path) -> Target:
    missing = [f for f in REQUIRED_FIELDS if _lookup(data, f) is None]
    if missing:
        raise ConfigError(f"{path}: target is missing field(s) {', '.join(missing)}; "
                          f"a target needs: {', '.join(REQUIRED_FIELDS)}")
    problems = _field_problems(data, path)
    if problems:  # every problem at once, so one edit fixes the file
        raise ConfigError(f"{path}: invalid target: {'; '.join(problems)}")
    energy = data["energy"]
    return Target(
        name=data["name"], description=data["description"], backend=data["backend"], threads=data["threads"],
        formats={t: tuple(data["formats"][t]) for t in LAYER_TYPES}, accuracy_level=data["accuracy_level"],
        lm_head_accuracy_level=data.get("lm_head_accuracy_level", data["accuracy_level"]),
        memory_limit_mb=float(data["memory_limit_mb"]),
        energy=EnergyModel(float(energy["power_compute_w"]), float(energy["power_transmit_w"]),
                           float(energy["power_idle_w"]), energy["source"]),
        cost_table=(path.parent / data["cost_table"]).resolve(), path=path, arch=data.get("arch"),
    )


def _field_problems(data: Mapping[str, Any], path: Path) -> list[str]:
    from edgellm.runtime.registry import backend_names  # light: the registry imports backends lazily

    problems = []
    if data["name"] != path.stem:
        problems.append(f"name {data['name']!r} differs from the file name {path.name!r}")
    if data["backend"] not in backend_names():
        problems.append(f"backend {data['backend']!r} unknown; valid: {', '.join(backend_names())}")
    if not isinstance(data["threads"], int) or data["threads"] < 1:
        problems.append(f"threads must be an integer >= 1, found {data['threads']!r}")
    for key in ("accuracy_level", "lm_head_accuracy_level"):
        if key in data and data[key] not in (0, 1, 2, 3, 4):
            problems.append(f"{key} must be 0-4, found {data[key]!r}")
    numbers = ["memory_limit_mb"] + [f"energy.{k}" for k in ("power_compute_w", "power_transmit_w", "power_idle_w")]
    for key in numbers:
        value = _lookup(data, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(f"{key} must be a number >= 0, found {value!r}")
    for layer_type in LAYER_TYPES:
        formats = data["formats"][layer_type]
        bad = [f for f in formats if f not in STORAGE_FORMATS] if isinstance(formats, list) else [formats]
        if bad or not formats:
            problems.append(f"formats.{layer_type} must be a non-empty list of {', '.join(STORAGE_FORMATS)}; "
                            f"found {formats!r}")
    unknown_types = set(data["formats"]) - set(LAYER_TYPES)
    if unknown_types:
        problems.append(f"formats has unknown layer type(s) {sorted(unknown_types)}; valid: {', '.join(LAYER_TYPES)}")
    return problems


@dataclass(frozen=True)
class CostEntry:
    """Timing of one linear: median and 10th/90th percentiles over the timed runs, microseconds."""

    median_us: float
    p10_us: float
    p90_us: float


@dataclass(frozen=True)
class CostTable:
    """Microseconds per (K, N, format, M) on one target, with what and where it was measured."""

    target: str
    entries: Mapping[CostKey, CostEntry]
    machine: Mapping[str, Any]
    threads: int
    ort_version: str
    accuracy_level: int = 4
    repeats: int = 0
    overhead_us: float | None = None  # decode token cost beyond its linears (None: not measured)
    estimated: bool = False  # True: not measured on the target itself; `source` says how it was derived
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # provenance (overhead breakdown, scale factor...)

    def cost_us(self, k: int, n: int, fmt: str, m: int = 1) -> float:
        """Median microseconds of one y = x @ W^T with x (M, K) and W (N, K) stored as `fmt`."""
        entry = self.entries.get((k, n, fmt, m))
        if entry is None:
            raise UnknownNameError(self._missing_message(k, n, fmt, m))
        return entry.median_us

    def _missing_message(self, k: int, n: int, fmt: str, m: int) -> str:
        same_shape = sorted({f for (kk, nn, f, mm) in self.entries if (kk, nn, mm) == (k, n, m)})
        shapes = sorted({(kk, nn, mm) for (kk, nn, _, mm) in self.entries})
        have = (f"formats measured for this shape: {', '.join(same_shape)}" if same_shape else
                "measured (K, N, M): " + ", ".join(f"({a}, {b}, {c})" for a, b, c in shapes))
        return (f"cost table of target {self.target} has no entry for K={k}, N={n}, format={fmt}, M={m}; "
                f"{have}; re-measure with: edgellm profile --target {self.target}")

    def scaled(self, factor: float, target: str, source: str, machine: Mapping[str, Any],
               threads: int) -> CostTable:
        """An estimate for another board (`machine`, `threads`): every time x `factor`, marked estimated."""
        if factor <= 0:
            raise ConfigError(f"scale factor must be > 0, found {factor}")
        entries = {key: CostEntry(e.median_us * factor, e.p10_us * factor, e.p90_us * factor)
                   for key, e in self.entries.items()}
        overhead = None if self.overhead_us is None else self.overhead_us * factor
        extra = {"shapes": self.extra.get("shapes", {}), "scale_factor": factor,
                 "based_on": {"target": self.target, "machine": dict(self.machine), "threads": self.threads,
                              "ort_version": self.ort_version, "overhead": self.extra.get("overhead")}}
        return replace(self, target=target, entries=entries, overhead_us=overhead, estimated=True, source=source,
                       machine=dict(machine), threads=threads, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        rows = [{"k": k, "n": n, "format": f, "m": m, "median_us": round(e.median_us, 3),
                 "p10_us": round(e.p10_us, 3), "p90_us": round(e.p90_us, 3)}
                for (k, n, f, m), e in sorted(self.entries.items())]
        return {"format": COST_TABLE_FORMAT, "format_version": 1, "target": self.target,
                "estimated": self.estimated, "source": self.source, "machine": dict(self.machine),
                "threads": self.threads, "onnxruntime": self.ort_version, "accuracy_level": self.accuracy_level,
                "repeats": self.repeats,
                "overhead_us": None if self.overhead_us is None else round(self.overhead_us, 3),
                "extra": dict(self.extra), "entries": rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "cost table") -> CostTable:
        required = ("target", "estimated", "source", "machine", "threads", "onnxruntime", "entries")
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
        if data.get("format", COST_TABLE_FORMAT) != COST_TABLE_FORMAT:
            raise ConfigError(f"{where}: format {data.get('format')!r} is not {COST_TABLE_FORMAT!r}")
        entries: dict[CostKey, CostEntry] = {}
        for i, row in enumerate(data["entries"]):
            try:
                key = (int(row["k"]), int(row["n"]), str(row["format"]), int(row["m"]))
                entries[key] = CostEntry(float(row["median_us"]), float(row["p10_us"]), float(row["p90_us"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: entry {i} is malformed ({exc!r}); needs k, n, format, m, "
                                  "median_us, p10_us, p90_us") from None
        overhead = data.get("overhead_us")
        return cls(target=data["target"], entries=entries, machine=data["machine"], threads=int(data["threads"]),
                   ort_version=str(data["onnxruntime"]), accuracy_level=int(data.get("accuracy_level", 4)),
                   repeats=int(data.get("repeats", 0)), overhead_us=None if overhead is None else float(overhead),
                   estimated=bool(data["estimated"]), source=str(data["source"]), extra=data.get("extra", {}))

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: cost table is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: cost table must be a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, where=str(path))

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically: a temporary file beside `path`, then os.replace (never a torn table)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(_dumps(self.to_dict()))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def predict_decode_us(self, layer_formats: Mapping[str, str], shapes: Mapping[str, tuple[int, int]]) -> float:
        """overhead_us + the linears' costs at M=1 for a model given as {layer: format}, {layer: (K, N)}."""
        if self.overhead_us is None:
            raise ConfigError(f"cost table of target {self.target} has no overhead_us; re-measure with: "
                              f"edgellm profile --target {self.target}")
        return self.overhead_us + sum(self.cost_us(*shapes[name], fmt) for name, fmt in layer_formats.items())


def _dumps(data: dict[str, Any]) -> str:
    """JSON with one line per cost entry (readable diffs when a table is re-measured)."""
    head = json.dumps({k: v for k, v in data.items() if k != "entries"}, indent=1)
    rows = ",\n".join("  " + json.dumps(row) for row in data["entries"])
    return head[:-2] + ',\n "entries": [\n' + rows + "\n ]\n}\n"


# ---- which linears a model's ONNX graph runs, and in which cost format ---------------------------------

# role of a linear as the ONNX graph runs it (Q|K|V and gate|up fused) -> (K, N) from the model config
def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """Distinct linear roles of a Llama graph with fused QKV and gate/up, as (K, N)."""
    return {**unit_shapes(cfg), "lm_head": (cfg.hidden_size, cfg.vocab_size)}


FUSED_PARTS = UNIT_ROLES

# an export manifest's layer description (onnx_export.prepare_weight) -> the cost format whose graph it has
# in the stock-op lowering (`--kernel matmulnbits`), the one the cost tables time.
# Q4_1 transcodes carry block offsets like int4 RTN asymmetric, so they run the same graph and cost the same.
_DESCRIPTION_FORMATS = (
    ("Q4_1 transcode", "int4"), ("Q4_0 transcode", "int4-sym"), ("Q8_0 transcode", "int8"),
    ("int8 RTN symmetric", "int8"), ("int4 RTN asymmetric", "int4"), ("int4 RTN symmetric", "int4-sym"),
    ("int2 RTN asymmetric", "int2"), ("fp32", "fp32"),
)


def cost_format(description: str) -> str:
    """Cost format of one exported layer, from the manifest's description (e.g. "Q4_1 transcode")."""
    if "edgellm BlockMatMul" in description:  # ~1.9x faster than the stock graph the table timed
        raise ConfigError(f"layer storage {description!r} runs edgellm's BlockMatMul, which the cost table "
                          f"has not timed; export with --kernel matmulnbits to compare with the table")
    for prefix, fmt in _DESCRIPTION_FORMATS:
        if description.startswith(prefix):
            return fmt
    raise ConfigError(f"layer storage {description!r} has no cost format; known: "
                      f"{', '.join(p for p, _ in _DESCRIPTION_FORMATS)}")


def export_linears(cfg, layers: Mapping[str, str]) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """({graph linear: cost format}, {graph linear: (K, N)}) of an export from its manifest's `layers`."""
    shapes = linear_shapes(cfg)
    formats: dict[str, str] = {}
    layer_shapes: dict[str, tuple[int, int]] = {}
    for i in range(cfg.n_layers):
        for role, parts in FUSED_PARTS.items():
            found = {cost_format(layers[f"blk.{i}.{p}"]) for p in parts}
            if len(found) != 1:  # the graph then runs the parts unfused: shapes the table does not hold
                raise ConfigError(f"blk.{i}.{role}: parts {parts} have different formats {sorted(found)}; "
                                  "the cost model expects one format per fused linear")
            formats[f"blk.{i}.{role}"], layer_shapes[f"blk.{i}.{role}"] = found.pop(), shapes[role]
    formats["lm_head"], layer_shapes["lm_head"] = cost_format(layers["lm_head"]), shapes["lm_head"]
    return formats, layer_shapes


def check_machine(target: Target) -> None:
    """Refuse to measure a board's table on a machine of another architecture."""
    here = platform.machine()
    if target.arch is not None and target.arch != here:
        raise ConfigError(f"target {target.name} is a {target.arch} board but this machine is {here}: its "
                          f"timings would not be the board's; run `edgellm profile --target {target.name}` on "
                          "the board itself")
