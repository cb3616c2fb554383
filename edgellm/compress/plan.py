"""A compression plan: which storage format each linear layer gets. Exporters consume it.

Formats:
  auto  keep the source's blocks when a lossless form exists (GGUF Q4_0/Q4_1/Q8_0), else fp32
  fp32  dense float32
  int8      8-bit symmetric round-to-nearest, blocks of 32
  int4      4-bit asymmetric round-to-nearest, blocks of 32 (min/scale per block, exact offset path)
  int4-sym  4-bit symmetric round-to-nearest, blocks of 32 (no offset: the cheapest 4-bit graph)
  int2      2-bit asymmetric round-to-nearest, blocks of 32 (offset path)

Every group-wise round-to-nearest format is named int{bits}[-sym][-g{group}]: bits 2, 3, 4, 8 (8 is
symmetric only, so plain "int8"), asymmetric unless "-sym", groups of 32 (the default) / 64 / 128.
QUANT_FORMATS holds them all as data. ONNX Runtime 1.32's MatMulNBits runs 2, 4 and 8 bits only
("Only 2b, 4b and 8b quantization is supported", measured), so 3-bit plans run on the reference backend
(dequantized weights) and the ONNX exporter refuses them. The exporter quantizes by name only the
RTN_FORMATS (blocks of 32); edgellm.compress.rtn.materialize turns any plan into stored blocks first.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.errors import ConfigError

ORT_MATMULNBITS_BITS = (2, 4, 8)  # what ONNX Runtime 1.32's MatMulNBits accepts (3 is refused at load)
SCALE_BYTES = 2  # scales and minima are fp16 values (block_formats.rtn_grid), stored in 2 bytes as in GGUF


@dataclass(frozen=True)
class QuantFormat:
    """Group-wise round-to-nearest: `bits` per weight, per group of `group` weights along K one fp16
    scale, and for asymmetric formats one fp16 minimum (applied by the offset path)."""

    bits: int
    symmetric: bool
    group: int = 32

    def nbytes(self, k: int, n: int) -> int:
        """Bytes of one K x N linear as a compressed model stores it: packed codes + fp16 scales (+ minima).
        (The ONNX export widens them to fp32, what MatMulNBits takes with fp32 activations.)"""
        groups = k * n // self.group
        return k * n * self.bits // 8 + groups * SCALE_BYTES * (1 if self.symmetric else 2)

    def bits_per_weight(self) -> float:
        return self.bits + SCALE_BYTES * 8 * (1 if self.symmetric else 2) / self.group

    @property
    def onnx_runnable(self) -> bool:
        return self.bits in ORT_MATMULNBITS_BITS


def _quant_formats() -> dict[str, QuantFormat]:
    table = {"int8": QuantFormat(8, True), "int4": QuantFormat(4, False), "int4-sym": QuantFormat(4, True),
             "int2": QuantFormat(2, False)}  # the original four first (error messages list them first)
    for bits in (2, 3, 4, 8):
        for symmetric in ((True,) if bits == 8 else (False, True)):
            for group in (32, 64, 128):
                name = f"int{bits}{'-sym' if symmetric and bits != 8 else ''}{'' if group == 32 else f'-g{group}'}"
                table.setdefault(name, QuantFormat(bits, symmetric, group))
    return table


QUANT_FORMATS: dict[str, QuantFormat] = _quant_formats()
FORMATS = ("auto", "fp32", *QUANT_FORMATS)
# (bits, symmetric) of the round-to-nearest formats the ONNX exporter quantizes by name (blocks of 32; the
# cost tables and the exporter's layer descriptions know exactly these)
RTN_FORMATS: dict[str, tuple[int, bool]] = {name: (QUANT_FORMATS[name].bits, QUANT_FORMATS[name].symmetric)
                                             for name in ("int8", "int4", "int4-sym", "int2")}


@dataclass(frozen=True)
class CompressionPlan:
    """default format, glob overrides on layer names (e.g. "blk.*.ffn_down": "int8"), compute mode."""

    default: str = "auto"
    overrides: dict[str, str] = field(default_factory=dict)
    lm_head: str = "auto"
    # 0: exact fp32 activations (stock MatMulNBits); 4: int8 activations (edgellm's BlockMatMul on GGUF
    # blocks, MatMulNBits for other formats)
    accuracy_level: int = 4
    lm_head_accuracy_level: int = 4
    name: str = "lossless-transcode"

    def __post_init__(self) -> None:
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"plan {self.name}: overrides must map layer patterns to formats, "
                              f"found {type(self.overrides).__name__}")
        for where, fmt in [("default", self.default), ("lm_head", self.lm_head), *self.overrides.items()]:
            if fmt not in FORMATS:
                raise ConfigError(f"plan {self.name}: format {fmt!r} for {where} is unknown; valid: {', '.join(FORMATS)}")
        for key in ("accuracy_level", "lm_head_accuracy_level"):
            if type(getattr(self, key)) is not int or getattr(self, key) not in (0, 1, 2, 3, 4):
                raise ConfigError(f"plan {self.name}: {key} must be 0-4, found {getattr(self, key)}")

    def format_for(self, layer: str) -> str:
        """Format of a linear layer such as "blk.3.attn_q" (the last matching override wins)."""
        fmt = self.default
        for pattern, value in self.overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                fmt = value
        return fmt

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompressionPlan:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"plan has unknown fields {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: plan is not valid JSON ({exc})") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: bad plan ({exc})") from None


EXACT_PLAN = CompressionPlan(accuracy_level=0, lm_head="fp32", lm_head_accuracy_level=0, name="lossless-exact")
PRESETS: dict[str, CompressionPlan] = {
    "lossless-transcode": CompressionPlan(),
    "lossless-exact": EXACT_PLAN,
    "fp32": CompressionPlan(default="fp32", lm_head="fp32", accuracy_level=0, lm_head_accuracy_level=0, name="fp32"),
    "int8": CompressionPlan(default="int8", lm_head="int8", name="int8"),
    "int4": CompressionPlan(default="int4", lm_head="int8", name="int4"),
}


def resolve_plan(spec: str | Path | None) -> CompressionPlan:
    """A preset name, a plan JSON file, or None (lossless transcode with int8 activations)."""
    if spec is None:
        return PRESETS["lossless-transcode"]
    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    if Path(spec).is_file():
        return CompressionPlan.load(spec)
    raise ConfigError(f"plan {spec!r} is neither a file nor a preset; presets: {', '.join(PRESETS)}")
