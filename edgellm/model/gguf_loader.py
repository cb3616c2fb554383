"""Read a GGUF file (llama.cpp's format) into a ModelDescription.

The header (magic, version, metadata, tensor index) is parsed here, straight from a read-only memory
map, following the GGUF spec (ggml `docs/gguf.md`): llama.cpp's PyPI `GGUFReader` builds one numpy view
per array element, which for a 49152-token vocabulary and 48900 merges costs seconds; decoding the
string arrays in one pass costs tens of milliseconds. Every read is bounds-checked, so a truncated or
corrupt file fails with a ModelFormatError naming the offset, never an IndexError. Tensors stay
memory-mapped and are dequantized (with `gguf.quants`) on first use, so `edgellm info` on a 100 MB file
reads kilobytes. Tests cross-check this parser against `gguf.GGUFReader`.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    ConfigError,
    ModelFormatError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from edgellm.model.config import ModelConfig, RopeScaling
from edgellm.model.description import ModelDescription, TokenizerSpec
from edgellm.model.weights import ModelWeights, WeightTensor

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8
MAX_ELEMENTS = 2**62  # llama.cpp rejects tensors whose element count overflows int64; so does numpy
# Architectures whose GGUF tensors and metadata follow the Llama layout edgellm implements.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama",)
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
# GGML types the file stores as plain numpy elements; every other type is stored as uint8 blocks.
_ELEMENT_DTYPES = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}

# GGUF metadata value types (gguf.GGUFValueType): scalar id -> struct/numpy format.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_FORMATS = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS = {k: struct.Struct("<" + f) for k, f in _SCALAR_FORMATS.items()}
# Smallest encodings, used to reject absurd counts before looping over them.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset


def load_gguf(path: str | Path) -> ModelDescription:
    """Parse header, metadata and tensor index; raise a ModelFormatError naming the problem."""
    path = Path(path)
    _check_magic(path)
    data = _map(path)
    header = _parse_header(path, data)
    fields = header.fields
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        found = "(missing)" if arch is None else repr(arch)
        raise UnsupportedArchitectureError(
            f"{path}: architecture {found} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    weights, type_counts = _read_tensors(path, data, header)
    config = _config_from_fields(path, fields, arch, tie_embeddings="output.weight" not in weights)
    description = ModelDescription(
        config=config,
        weights=weights,
        tokenizer=_tokenizer_from_fields(path, fields),
        source=path,
        file_type=_dominant_quant_type(type_counts),
        metadata={k: v for k, v in fields.items() if not k.startswith("tokenizer.ggml.")},
    )
    description.validate()
    return description


def _check_magic(path: Path) -> None:
    if not path.exists():
        raise ModelFormatError(f"{path}: no such model file")
    if not path.is_file():
        raise ModelFormatError(f"{path}: not a regular file (expected a .gguf model file)")
    with path.open("rb") as fh:
        head = fh.read(4)
    if not head:
        raise ModelFormatError(f"{path}: file is empty (0 bytes); expected a GGUF file starting with magic {GGUF_MAGIC!r}")
    if head != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: wrong magic: expected {GGUF_MAGIC!r} (a GGUF file), found {head!r}")


def _map(path: Path) -> np.ndarray:
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: cannot memory-map the file ({exc})") from None


# ---------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index: GGUF dims (ne0 = columns first), GGML type id, data offset."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # relative to the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]  # includes "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count" like gguf's reader
    tensors: list[TensorInfo]
    alignment: int
    data_start: int  # absolute offset of the tensor data section


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; every failure names what and where."""

    def __init__(self, path: Path, data: np.ndarray) -> None:
        self.path = path
        self.buf = memoryview(data)
        self.size = len(self.buf)
        self.pos = 0

    def fail(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: corrupt GGUF header: {message}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ModelFormatError(
                f"{self.path}: truncated: {what} at offset {self.pos} needs {n} bytes, "
                f"but the file ends at {self.size}"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        start = self.pos
        self.pos += n
        try:
            return str(self.buf[start:self.pos], "utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at offset {start} is not valid UTF-8 ({exc.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            self.need(fmt.size, what)
            (value,) = fmt.unpack_from(self.buf, self.pos)
            self.pos += fmt.size
            return value
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown value type {vtype} at offset {self.pos - 4}")

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        itype = self.u32(f"element type of {what}")
        n = self.u64(f"length of {what}")
        if itype in _NUMPY_FORMATS:
            dtype = np.dtype("<" + _NUMPY_FORMATS[itype])
            self.need(n * dtype.itemsize, f"{n} elements of {what}")
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos += n * dtype.itemsize
            return values
        if itype == _STRING:
            self.need(n * 8, f"{n} strings of {what}")  # each needs at least its length
            buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
            out: list[str] = []
            append = out.append
            try:
                for _ in range(n):
                    (length,) = unpack(buf, pos)
                    pos += 8
                    end = pos + length
                    if end > size:
                        break
                    append(str(buf[pos:end], "utf-8"))
                    pos = end
            except struct.error:  # a length field itself runs past the end
                pass
            except UnicodeDecodeError as exc:
                raise self.fail(f"{what}[{len(out)}] at offset {pos} is not valid UTF-8 ({exc.reason})") from None
            if len(out) < n:
                self.pos = pos
                raise ModelFormatError(
                    f"{self.path}: truncated: {what} holds {n} strings, the file ends after {len(out)} "
                    f"(offset {self.size})"
                )
            self.pos = pos
            return out
        if itype == _ARRAY:
            self.need(n * 12, f"{n} arrays of {what}")
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(n)]
        raise self.fail(f"{what} is an array of unknown value type {itype}")


def parse_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF header without building a model (for tools and tests)."""
    path = Path(path)
    _check_magic(path)
    return _parse_header(path, _map(path))


def _parse_header(path: Path, data: np.ndarray) -> GGUFHeader:
    c = _Cursor(path, data)
    c.pos = len(GGUF_MAGIC)
    version = c.u32("GGUF version")
    if version & 0xFFFF == 0 and version != 0:
        raise ModelFormatError(f"{path}: big-endian GGUF files are not supported (version field {version:#x})")
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ModelFormatError(
            f"{path}: GGUF version {version} is not supported; supported: "
            f"{', '.join(map(str, SUPPORTED_GGUF_VERSIONS))} (corrupt file?)"
        )
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > c.size - c.pos:
        raise ModelFormatError(
            f"{path}: truncated or corrupt: header claims {n_kv} metadata fields and {n_tensors} tensors, "
            f"which cannot fit in the {c.size} bytes of the file"
        )
    fields: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for i in range(n_kv):
        key = c.string(f"key of metadata field #{i}")
        vtype = c.u32(f"value type of metadata field {key!r}")
        value = c.value(vtype, f"metadata field {key!r}")
        if key in fields:
            raise c.fail(f"metadata field {key!r} appears twice")
        fields[key] = value

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}")
        n_dims = c.u32(f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(c.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        type_id = c.u32(f"type of tensor {name!r}")
        offset = c.u64(f"data offset of tensor {name!r}")
        if name in names:
            raise c.fail(f"tensor {name!r} appears twice")
        names.add(name)
        tensors.append(TensorInfo(name=name, dims=dims, type_id=type_id, offset=offset))

    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment must be a power of two, found {alignment!r}")
    data_start = -(-c.pos // alignment) * alignment
    return GGUFHeader(version=version, fields=fields, tensors=tensors, alignment=alignment, data_start=data_start)


# --------------------------------------------------------------------------------------------- tensors


def _read_tensors(path: Path, data: np.ndarray, header: GGUFHeader) -> tuple[ModelWeights, Counter]:
    import gguf

    tensors: dict[str, WeightTensor] = {}
    counts: Counter = Counter()
    checked: set[str] = set()
    size = len(data)
    for info in header.tensors:
        try:
            tensor_type = gguf.GGMLQuantizationType(info.type_id)
        except ValueError:
            raise UnsupportedTensorTypeError(
                f"{path}: tensor {info.name} has GGML type id {info.type_id}, which is unknown to edgellm "
                f"(a newer GGUF, or a corrupt file)"
            ) from None
        qtype = tensor_type.name
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        shape = tuple(reversed(info.dims))  # GGUF lists ne0 (columns) first
        n_elements = math.prod(shape)
        if n_elements >= MAX_ELEMENTS or any(d >= MAX_ELEMENTS for d in shape):
            raise ModelFormatError(f"{path}: corrupt tensor index: tensor {info.name} has dimensions {shape}")
        row = info.dims[0] if info.dims else 1
        if row % block_size:
            raise ModelFormatError(
                f"{path}: tensor {info.name} ({qtype}) has rows of {row} values, "
                f"not a multiple of the {block_size}-value block"
            )
        n_bytes = n_elements // block_size * type_size
        start = header.data_start + info.offset
        if info.offset % header.alignment:
            raise ModelFormatError(
                f"{path}: corrupt tensor index: tensor {info.name} data offset {info.offset} "
                f"is not a multiple of the alignment {header.alignment}"
            )
        if start + n_bytes > size:
            raise ModelFormatError(
                f"{path}: truncated: tensor {info.name} needs bytes {start}..{start + n_bytes}, "
                f"but the file ends at {size}"
            )
        if qtype not in checked:
            _check_dequantizable(path, info.name, tensor_type, type_size)
            checked.add(qtype)
        if qtype in _ELEMENT_DTYPES:
            raw_shape = shape
            dtype = np.dtype("<" + _ELEMENT_DTYPES[qtype])
        else:  # block types (and BF16) stay as uint8 rows of blocks, like gguf's reader gives them
            raw_shape = (*shape[:-1], row // block_size * type_size) if shape else (type_size,)
            dtype = np.dtype(np.uint8)
        raw = data[start:start + n_bytes].view(dtype).reshape(raw_shape)
        counts[qtype] += n_elements
        tensors[info.name] = WeightTensor(
            name=info.name,
            shape=shape,
            qtype=qtype,
            raw=raw,
            _dequantize=_dequantizer(raw, tensor_type, qtype, gguf),
        )
    return ModelWeights(tensors, source=str(path)), counts


def _dequantizer(data: np.ndarray, tensor_type: Any, qtype: str, gguf: Any):
    if qtype in FLOAT_TYPES:
        return lambda: np.asarray(data, dtype=np.float32)
    return lambda: gguf.quants.dequantize(data, tensor_type)


def _check_dequantizable(path: Path, name: str, tensor_type: Any, type_size: int) -> None:
    import gguf

    if tensor_type.name in FLOAT_TYPES:
        return
    try:
        with np.errstate(all="ignore"):
            gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), tensor_type)
    except (NotImplementedError, KeyError, ValueError) as exc:
        raise UnsupportedTensorTypeError(
            f"{path}: tensor {name} has type {tensor_type.name}, which edgellm cannot dequantize ({exc})"
        ) from None


def _dominant_quant_type(counts: Counter) -> str:
    quant = {k: v for k, v in counts.items() if k not in FLOAT_TYPES}
    pool = quant or counts
    return max(pool, key=pool.get) if pool else ""


# ------------------------------------------------------------------------------------------- metadata


def _require(path: Path, fields: dict[str, Any], key: str, kind: type) -> Any:
    value = fields.get(key)
    if value is None:
        raise ModelFormatError(f"{path}: metadata field {key!r} is missing")
    return _convert(path, key, value, kind)


def _optional(path: Path, fields: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = fields.get(key)
    return default if value is None else _convert(path, key, value, kind)


def _convert(path: Path, key: str, value: Any, kind: type) -> Any:
    if isinstance(value, (list, str, bool)) and kind is not str:
        raise ModelFormatError(f"{path}: metadata field {key!r} should be {kind.__name__}, found {value!r:.80}")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ModelFormatError(
            f"{path}: metadata field {key!r} should be {kind.__name__}, found {value!r:.80}"
        ) from None


def _config_from_fields(path: Path, fields: dict[str, Any], arch: str, tie_embeddings: bool) -> ModelConfig:
    n_heads = _require(path, fields, f"{arch}.attention.head_count", int)
    hidden = _require(path, fields, f"{arch}.embedding_length", int)
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = _optional(path, fields, f"{arch}.vocab_size", int, None)
    if vocab is None and isinstance(tokens, list) and tokens:
        vocab = len(tokens)
    if vocab is None:
        raise ModelFormatError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    scaling_type = str(fields.get(f"{arch}.rope.scaling.type") or "none")
    if scaling_type not in ("none", "linear"):
        raise UnsupportedArchitectureError(
            f"{path}: rope scaling {scaling_type!r} is not supported; supported: none, linear"
        )
    linear = scaling_type == "linear"
    try:
        scaling = RopeScaling(
            kind="linear" if linear else "none",
            factor=_optional(path, fields, f"{arch}.rope.scaling.factor", float, 1.0) if linear else 1.0,
            original_context=_optional(path, fields, f"{arch}.rope.scaling.original_context_length", int, 0),
        )
        return ModelConfig(
            architecture=arch,
            n_layers=_require(path, fields, f"{arch}.block_count", int),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=_optional(path, fields, f"{arch}.attention.head_count_kv", int, n_heads),
            ffn_size=_require(path, fields, f"{arch}.feed_forward_length", int),
            vocab_size=vocab,
            context_length=_require(path, fields, f"{arch}.context_length", int),
            head_dim=_optional(
                path, fields, f"{arch}.attention.key_length", int,
                _optional(path, fields, f"{arch}.rope.dimension_count", int, 0),
            ),
            rope_theta=_optional(path, fields, f"{arch}.rope.freq_base", float, 10000.0),
            rope_style="interleaved",
            rope_scaling=scaling,
            norm_eps=_optional(path, fields, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-5),
            tie_embeddings=tie_embeddings,
            name=str(fields.get("general.name") or path.stem),
        )
    except ConfigError as exc:
        raise ModelFormatError(f"{path}: invalid model hyper-parameters in metadata: {exc}") from None


def _tokenizer_from_fields(path: Path, fields: dict[str, Any]) -> TokenizerSpec | None:
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        return None

    def string_list(key: str) -> list[str]:
        value = fields.get(key) or []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ModelFormatError(f"{path}: metadata field {key!r} should be an array of strings")
        return value

    def token_id(key: str) -> int | None:
        value = _optional(path, fields, key, int, None)
        if value is not None and not 0 <= value < len(tokens):
            raise ModelFormatError(f"{path}: metadata field {key!r} = {value} is outside the vocabulary "
                                   f"of {len(tokens)} tokens")
        return value

    tokens = string_list("tokenizer.ggml.tokens")
    types = fields.get("tokenizer.ggml.token_type")
    if types is None:
        types = [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        found = f"{len(types)} entries" if isinstance(types, list) else repr(types)
        raise ModelFormatError(
            f"{path}: metadata field 'tokenizer.ggml.token_type' should hold {len(tokens)} integers "
            f"(one per token), found {found}"
        )
    eot = token_id("tokenizer.ggml.eot_token_id")
    template = fields.get("tokenizer.chat_template")
    return TokenizerSpec(
        model=str(fields.get("tokenizer.ggml.model") or "gpt2"),
        pre=str(fields.get("tokenizer.ggml.pre") or "default"),
        tokens=tuple(tokens),
        token_types=tuple(types),
        merges=tuple(string_list("tokenizer.ggml.merges")),
        bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=token_id("tokenizer.ggml.eos_token_id"),
        unk_id=token_id("tokenizer.ggml.unknown_token_id"),
        pad_id=token_id("tokenizer.ggml.padding_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=template if isinstance(template, str) else None,
        extra_eos_ids=() if eot is None else (eot,),
    )
