"""Write tiny, valid Llama GGUF files with seeded random weights, for fast structural tests.

The file is written by llama.cpp's own PyPI writer (`gguf.GGUFWriter`), so it is a real GGUF that
llama.cpp would parse; the knobs (`drop_tensors`, `bad_shapes`, `drop_metadata`, `tensor_qtypes`, ...)
build the malformed variants the loader tests need. `tiny_tensors` returns the exact arrays a call of
`write_tiny_gguf` with the same arguments stores, so tests can compare what was read with what was written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# Tokenizer: GPT-2's byte-level alphabet, a few merges, a few control tokens (llama.cpp type 3).
# Ranked so that every merged token is reachable: " the" -> Ġt, Ġth, Ġthe; "hello" -> he, ll, hell + o.
TINY_MERGES: tuple[str, ...] = ("Ġ t", "Ġt h", "Ġth e", "h e", "l l", "he ll", "o r", "Ġ w")
CONTROL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3

BLOCK_QTYPES = ("Q8_0", "Q4_0", "Q4_1")
SUPPORTED_QTYPES = ("F32", "F16", *BLOCK_QTYPES)


def byte_level_alphabet() -> list[str]:
    """GPT-2's `bytes_to_unicode`: the 256 printable characters byte-level BPE uses for bytes 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, chars, strict=True))
    return [chr(by_byte[b]) for b in range(256)]


@dataclass(frozen=True)
class TinyVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int


def tiny_vocab(vocab: int | None = None) -> TinyVocab:
    """256 byte tokens + one token per merge + control tokens, padded with normal filler tokens to `vocab`."""
    tokens = byte_level_alphabet()
    tokens += ["".join(m.split(" ")) for m in TINY_MERGES]
    types = [TOKEN_TYPE_NORMAL] * len(tokens)
    eos = len(tokens)
    tokens += list(CONTROL_TOKENS)
    types += [TOKEN_TYPE_CONTROL] * len(CONTROL_TOKENS)
    if vocab is not None:
        if vocab < len(tokens):
            raise ValueError(f"vocab must be >= {len(tokens)} (bytes + merges + control tokens), got {vocab}")
        filler = vocab - len(tokens)
        tokens += [f"<filler_{i}>" for i in range(filler)]
        types += [TOKEN_TYPE_NORMAL] * filler
    return TinyVocab(tokens=tokens, token_types=types, merges=list(TINY_MERGES), bos_id=eos, eos_id=eos)


@dataclass(frozen=True)
class TinyTensor:
    """One tensor as written: float values (numpy order) and the array handed to the writer."""

    name: str
    values: np.ndarray  # float32, logical shape (what a lossless reader must give back for F32)
    stored: np.ndarray  # float32/float16 array, or uint8 blocks (rows x bytes) for block types
    qtype: str


def _quantize(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    gtype = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return values.astype(np.float32)
    if qtype == "F16":
        return values.astype(np.float16)
    block, type_size = gguf.GGML_QUANT_SIZES[gtype]
    if values.shape[-1] % block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {block}, got shape {values.shape}")
    try:
        return gguf.quants.quantize(values, gtype)
    except NotImplementedError:
        # gguf cannot quantize this type (e.g. Q8_1): store seeded random blocks of the right size.
        n_bytes = values.shape[-1] // block * type_size
        return rng.integers(0, 256, size=(*values.shape[:-1], n_bytes), dtype=np.uint8)


def tiny_tensors(
    *,
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    vocab: int | None = None,
    seed: int = 0,
    qtype: str = "F32",
    embd_qtype: str | None = None,
    drop_tensors: Iterable[str] = (),
    bad_shapes: Mapping[str, tuple[int, ...]] | None = None,
    tensor_qtypes: Mapping[str, str] | None = None,
) -> dict[str, TinyTensor]:
    """The tensors `write_tiny_gguf` writes for the same arguments, in file order."""
    if qtype not in SUPPORTED_QTYPES:
        raise ValueError(f"qtype {qtype!r} unsupported; valid: {', '.join(SUPPORTED_QTYPES)}")
    bad_shapes = dict(bad_shapes or {})
    tensor_qtypes = dict(tensor_qtypes or {})
    dropped = set(drop_tensors)
    n_vocab = len(tiny_vocab(vocab).tokens)
    head_dim = hidden // n_heads
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "token_embd.weight": ((n_vocab, hidden), embd_qtype or qtype),
    }
    for i in range(n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": ((hidden,), "F32"),
            f"blk.{i}.attn_q.weight": ((q, hidden), qtype),
            f"blk.{i}.attn_k.weight": ((kv, hidden), qtype),
            f"blk.{i}.attn_v.weight": ((kv, hidden), qtype),
            f"blk.{i}.attn_output.weight": ((hidden, q), qtype),
            f"blk.{i}.ffn_norm.weight": ((hidden,), "F32"),
            f"blk.{i}.ffn_gate.weight": ((ffn, hidden), qtype),
            f"blk.{i}.ffn_up.weight": ((ffn, hidden), qtype),
            f"blk.{i}.ffn_down.weight": ((hidden, ffn), qtype),
        })
    shapes["output_norm.weight"] = ((hidden,), "F32")
    unknown = (set(bad_shapes) | set(tensor_qtypes) | dropped) - set(shapes)
    if unknown:
        raise ValueError(f"unknown tensor name(s): {sorted(unknown)}")

    rng = np.random.default_rng(seed)
    block_rng = np.random.default_rng(seed + 1)  # separate, so a type override keeps every value the same
    out: dict[str, TinyTensor] = {}
    for name, (shape, kind) in shapes.items():
        shape = tuple(bad_shapes.get(name, shape))
        kind = tensor_qtypes.get(name, kind)
        if len(shape) == 1:  # RMSNorm gains near 1
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            values = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if name in dropped:
            continue
        out[name] = TinyTensor(name=name, values=values, stored=_quantize(values, kind, block_rng), qtype=kind)
    return out


def tiny_metadata(
    *,
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    vocab: int | None = None,
    arch: str = "llama",
    context_length: int = 256,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    with_tokenizer: bool = True,
) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    """Key -> (value, GGUF type), in the order llama.cpp's converter writes them."""
    v = gguf.GGUFValueType
    voc = tiny_vocab(vocab)
    meta: dict[str, tuple[Any, gguf.GGUFValueType]] = {
        "general.name": ("tiny-llama-test", v.STRING),
        f"{arch}.block_count": (n_layers, v.UINT32),
        f"{arch}.context_length": (context_length, v.UINT32),
        f"{arch}.embedding_length": (hidden, v.UINT32),
        f"{arch}.feed_forward_length": (ffn, v.UINT32),
        f"{arch}.attention.head_count": (n_heads, v.UINT32),
        f"{arch}.attention.head_count_kv": (n_kv_heads, v.UINT32),
        f"{arch}.rope.freq_base": (rope_theta, v.FLOAT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (norm_eps, v.FLOAT32),
        f"{arch}.rope.dimension_count": (hidden // n_heads, v.UINT32),
        f"{arch}.vocab_size": (len(voc.tokens), v.UINT32),
    }
    if with_tokenizer:
        meta.update({
            "tokenizer.ggml.model": ("gpt2", v.STRING),
            "tokenizer.ggml.pre": ("gpt2", v.STRING),
            "tokenizer.ggml.tokens": (voc.tokens, v.ARRAY),
            "tokenizer.ggml.token_type": (voc.token_types, v.ARRAY),
            "tokenizer.ggml.merges": (voc.merges, v.ARRAY),
            "tokenizer.ggml.bos_token_id": (voc.bos_id, v.UINT32),
            "tokenizer.ggml.eos_token_id": (voc.eos_id, v.UINT32),
            "tokenizer.ggml.add_bos_token": (False, v.BOOL),
        })
    return meta


def write_tiny_gguf(
    path: str | Path,
    *,
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    vocab: int | None = None,
    seed: int = 0,
    qtype: str = "F32",
    arch: str = "llama",
    drop_tensors: Iterable[str] = (),
    bad_shapes: Mapping[str, tuple[int, ...]] | None = None,
    with_tokenizer: bool = True,
    embd_qtype: str | None = None,
    tensor_qtypes: Mapping[str, str] | None = None,
    drop_metadata: Iterable[str] = (),
    extra_metadata: Mapping[str, tuple[Any, gguf.GGUFValueType]] | None = None,
    alignment: int | None = None,
) -> Path:
    """Write a tiny Llama GGUF and return its path.

    Linear weights (and the tied token embedding, unless `embd_qtype` says otherwise) are stored in
    `qtype`: F32, F16, Q8_0, Q4_0 or Q4_1 (block types need `hidden`, `ffn` and `n_heads * head_dim`
    to be multiples of 32). Norms are F32. `tensor_qtypes` overrides the type of single tensors; a type
    gguf cannot quantize (e.g. "Q8_1") gets seeded random blocks. `drop_metadata` removes keys,
    `extra_metadata` adds or overrides them ({key: (value, gguf.GGUFValueType)}); `alignment` sets
    `general.alignment` (the writer then pads tensor data to it).
    """
    path = Path(path)
    tensors = tiny_tensors(
        n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn=ffn, vocab=vocab,
        seed=seed, qtype=qtype, embd_qtype=embd_qtype, drop_tensors=drop_tensors, bad_shapes=bad_shapes,
        tensor_qtypes=tensor_qtypes,
    )
    meta = tiny_metadata(
        n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn=ffn, vocab=vocab,
        arch=arch, with_tokenizer=with_tokenizer,
    )
    meta.update(extra_metadata or {})

    drop = set(drop_metadata)
    for key in drop:
        meta.pop(key, None)

    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype) in meta.items():
        writer.add_key_value(key, value, vtype)
    for key in drop & set(writer.kv_data[0]):  # the writer adds general.architecture itself
        del writer.kv_data[0][key]
    for t in tensors.values():
        gtype = gguf.GGMLQuantizationType[t.qtype]
        if t.qtype in ("F32", "F16"):
            writer.add_tensor(t.name, t.stored)
        else:
            writer.add_tensor(t.name, t.stored, raw_shape=t.stored.shape, raw_dtype=gtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
