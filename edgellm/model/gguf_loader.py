"""Read a GGUF file (llama.cpp's format) into a ModelDescription.

The header is parsed with the PyPI `gguf` reader; tensors stay memory-mapped and are dequantized on
first use, so `edgellm info` on a 100 MB file reads kilobytes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    ModelFormatError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from edgellm.model.config import ModelConfig, RopeScaling
from edgellm.model.description import ModelDescription, TokenizerSpec
from edgellm.model.weights import ModelWeights, WeightTensor

GGUF_MAGIC = b"GGUF"
# Architectures whose GGUF tensors and metadata follow the Llama layout edgellm implements.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama",)
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def load_gguf(path: str | Path) -> ModelDescription:
    """Parse header, metadata and tensor index; raise a ModelFormatError naming the problem."""
    path = Path(path)
    _check_magic(path)
    reader = _open_reader(path)
    fields = {name: _field_value(f) for name, f in reader.fields.items()}
    arch = str(fields.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: architecture {arch or '(missing)'!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    weights, type_counts = _read_tensors(path, reader)
    config = _config_from_fields(path, fields, arch, tie_embeddings="output.weight" not in weights)
    description = ModelDescription(
        config=config,
        weights=weights,
        tokenizer=_tokenizer_from_fields(fields),
        source=path,
        file_type=_dominant_quant_type(type_counts),
        metadata={k: v for k, v in fields.items() if not k.startswith("tokenizer.ggml.")},
    )
    description.validate()
    return description


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such model file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: wrong magic: expected {GGUF_MAGIC!r} (a GGUF file), found {head!r}")


def _open_reader(path: Path) -> Any:
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/... on damaged headers
        raise ModelFormatError(f"{path}: corrupt or truncated GGUF header ({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise ModelFormatError(
                f"{path}: truncated: tensor {t.name} needs bytes up to offset {end}, file has {size}"
            )
    return reader


def _field_value(field: Any) -> Any:
    try:
        value = field.contents()
    except Exception:
        return None
    return value


def _read_tensors(path: Path, reader: Any) -> tuple[ModelWeights, Counter]:
    import gguf

    tensors: dict[str, WeightTensor] = {}
    counts: Counter = Counter()
    checked: set[str] = set()
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first
        if qtype not in checked:
            _check_dequantizable(path, t, qtype)
            checked.add(qtype)
        counts[qtype] += int(np.prod(shape))
        tensors[t.name] = WeightTensor(
            name=t.name,
            shape=shape,
            qtype=qtype,
            raw=t.data,
            _dequantize=_dequantizer(t.data, t.tensor_type, qtype, gguf),
        )
    return ModelWeights(tensors, source=str(path)), counts


def _dequantizer(data: np.ndarray, tensor_type: Any, qtype: str, gguf: Any):
    if qtype in FLOAT_TYPES:
        return lambda: np.asarray(data, dtype=np.float32)
    return lambda: gguf.quants.dequantize(data, tensor_type)


def _check_dequantizable(path: Path, t: Any, qtype: str) -> None:
    import gguf

    if qtype in FLOAT_TYPES:
        return
    try:
        gguf.quants.dequantize(np.asarray(t.data[:1]), t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as exc:
        raise UnsupportedTensorTypeError(
            f"{path}: tensor {t.name} has type {qtype}, which edgellm cannot dequantize ({exc})"
        ) from None


def _dominant_quant_type(counts: Counter) -> str:
    quant = {k: v for k, v in counts.items() if k not in FLOAT_TYPES}
    pool = quant or counts
    return max(pool, key=pool.get) if pool else ""


def _require(path: Path, fields: dict[str, Any], key: str, kind: type) -> Any:
    value = fields.get(key)
    if value is None:
        raise ModelFormatError(f"{path}: metadata field {key!r} is missing")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ModelFormatError(f"{path}: metadata field {key!r} should be {kind.__name__}, found {value!r}") from None


def _config_from_fields(path: Path, fields: dict[str, Any], arch: str, tie_embeddings: bool) -> ModelConfig:
    n_heads = _require(path, fields, f"{arch}.attention.head_count", int)
    hidden = _require(path, fields, f"{arch}.embedding_length", int)
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = fields.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ModelFormatError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    scaling_type = str(fields.get(f"{arch}.rope.scaling.type") or "none")
    scaling = RopeScaling(
        kind="linear" if scaling_type == "linear" else "none",
        factor=float(fields.get(f"{arch}.rope.scaling.factor") or 1.0) if scaling_type == "linear" else 1.0,
        original_context=int(fields.get(f"{arch}.rope.scaling.original_context_length") or 0),
    )
    return ModelConfig(
        architecture=arch,
        n_layers=_require(path, fields, f"{arch}.block_count", int),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv") or n_heads),
        ffn_size=_require(path, fields, f"{arch}.feed_forward_length", int),
        vocab_size=int(vocab),
        context_length=_require(path, fields, f"{arch}.context_length", int),
        head_dim=int(fields.get(f"{arch}.attention.key_length") or fields.get(f"{arch}.rope.dimension_count") or 0),
        rope_theta=float(fields.get(f"{arch}.rope.freq_base") or 10000.0),
        rope_style="interleaved",
        rope_scaling=scaling,
        norm_eps=float(fields.get(f"{arch}.attention.layer_norm_rms_epsilon") or 1e-5),
        tie_embeddings=tie_embeddings,
        name=str(fields.get("general.name") or path.stem),
    )


def _tokenizer_from_fields(fields: dict[str, Any]) -> TokenizerSpec | None:
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        return None

    def opt_int(key: str) -> int | None:
        value = fields.get(key)
        return None if value is None else int(value)

    return TokenizerSpec(
        model=str(fields.get("tokenizer.ggml.model") or "gpt2"),
        pre=str(fields.get("tokenizer.ggml.pre") or "default"),
        tokens=tuple(tokens),
        token_types=tuple(int(x) for x in (fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))),
        merges=tuple(fields.get("tokenizer.ggml.merges") or ()),
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
        pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
        extra_eos_ids=tuple(int(x) for x in ([fields["tokenizer.ggml.eot_token_id"]]
                                             if fields.get("tokenizer.ggml.eot_token_id") is not None else [])),
    )
