"""Tensor payloads on the wire (PROTOCOL.md): a fixed little-endian header, then C-order data. Never pickle.

    ELT1 | dtype u8 | ndim u8 | 0x0000 | ndim x u32 dims | prod(dims) x itemsize bytes
    ELTS | count u32 | count x (u32 byte length | ELT1 payload)

Decoding validates everything a hostile or confused peer could send (magic, dtype, rank, dims, length,
non-finite floats) and raises PayloadError with a one-line message, which the server answers as 400.
bfloat16 travels as the upper 16 bits of float32 (rounded to nearest even, as torch does) and is widened
back to float32 on decode, since numpy has no bfloat16.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgellm.errors import ConfigError

CONTENT_TYPE = "application/x-edgellm-tensor"
TENSOR_MAGIC = b"ELT1"
SET_MAGIC = b"ELTS"
MAX_NDIM = 4
MAX_SET_COUNT = 4096  # a KV transfer is 2 tensors per layer; far more is a malformed or hostile payload

_HEADER = struct.Struct("<4sBBH")  # magic, dtype code, ndim, reserved
_U32 = struct.Struct("<I")


class PayloadError(ConfigError):
    """A tensor payload is malformed; `code` is the short machine-readable reason."""

    def __init__(self, message: str, code: str = "bad_payload") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class WireDType:
    """One dtype the wire carries: its header code and the numpy dtype its bytes are stored as."""

    name: str
    code: int
    storage: np.dtype

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


WIRE_DTYPES: dict[str, WireDType] = {d.name: d for d in (
    WireDType("float32", 0, np.dtype("<f4")),
    WireDType("float16", 1, np.dtype("<f2")),
    WireDType("bfloat16", 2, np.dtype("<u2")),  # upper half of a float32
    WireDType("int32", 3, np.dtype("<i4")),
    WireDType("int64", 4, np.dtype("<i8")),
)}
_BY_CODE = {d.code: d for d in WIRE_DTYPES.values()}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int32", "int64")


def wire_dtype(name: str) -> WireDType:
    """Look up a wire dtype by name; the error lists the valid names."""
    if name not in WIRE_DTYPES:
        raise ConfigError(f"unknown wire dtype {name!r}; valid dtypes: {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits, round to nearest even; NaN stays a quiet NaN (torch's rule)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 (exact: bfloat16 is a truncated float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_tensor(array: np.ndarray, dtype: str | None = None) -> bytes:
    """One ELT1 payload. dtype None keeps the array's own (it must be a wire dtype); bfloat16 must be asked for."""
    a = np.asarray(array)
    name = dtype or a.dtype.name
    wd = wire_dtype(name)
    if not 1 <= a.ndim <= MAX_NDIM or 0 in a.shape:
        raise PayloadError(f"cannot encode shape {a.shape}: need 1..{MAX_NDIM} non-zero dims", "bad_shape")
    if name == "bfloat16":
        data = float32_to_bfloat16_bits(a.astype(np.float32, copy=False))
    else:
        data = np.ascontiguousarray(a, dtype=wd.storage)
    header = _HEADER.pack(TENSOR_MAGIC, wd.code, a.ndim, 0) + b"".join(_U32.pack(d) for d in a.shape)
    return header + data.tobytes()


def decode_tensor(data: bytes | memoryview, *, allowed: Sequence[str] | None = None, ndim: int | None = None,
                  finite: bool = False, what: str = "tensor") -> np.ndarray:
    """Parse and validate one ELT1 payload; returns a writable array (bfloat16 widened to float32).

    allowed: wire dtype names accepted here; ndim: required rank; finite: reject NaN/inf (hidden states).
    """
    buf = memoryview(data).cast("B")
    if len(buf) < _HEADER.size:
        raise PayloadError(f"{what}: payload of {len(buf)} bytes is shorter than the {_HEADER.size}-byte header",
                           "truncated")
    magic, code, rank, reserved = _HEADER.unpack_from(buf)
    if magic != TENSOR_MAGIC:
        raise PayloadError(f"{what}: bad magic {bytes(magic)!r}, expected {TENSOR_MAGIC!r}", "bad_magic")
    if code not in _BY_CODE:
        raise PayloadError(f"{what}: unknown dtype code {code}; valid codes: "
                           + ", ".join(f"{d.code} {d.name}" for d in _BY_CODE.values()), "bad_dtype")
    wd = _BY_CODE[code]
    if allowed is not None and wd.name not in allowed:
        raise PayloadError(f"{what}: dtype {wd.name} not accepted here; expected one of {', '.join(allowed)}",
                           "bad_dtype")
    if not 1 <= rank <= MAX_NDIM:
        raise PayloadError(f"{what}: ndim {rank} outside 1..{MAX_NDIM}", "bad_shape")
    if ndim is not None and rank != ndim:
        raise PayloadError(f"{what}: expected {ndim} dims, found {rank}", "bad_shape")
    if reserved != 0:
        raise PayloadError(f"{what}: reserved header bytes must be zero, found {reserved:#06x}", "bad_header")
    start = _HEADER.size + 4 * rank
    if len(buf) < start:
        raise PayloadError(f"{what}: payload of {len(buf)} bytes ends inside the {rank} dims", "truncated")
    shape = struct.unpack_from(f"<{rank}I", buf, _HEADER.size)
    if 0 in shape:
        raise PayloadError(f"{what}: shape {shape} has a zero dim", "bad_shape")
    expected = int(np.prod(shape, dtype=object)) * wd.itemsize  # Python ints: no overflow on hostile dims
    if len(buf) - start != expected:
        raise PayloadError(f"{what}: shape {shape} {wd.name} needs {expected} data bytes, found {len(buf) - start}",
                           "length_mismatch")
    array = np.frombuffer(buf[start:], dtype=wd.storage).reshape(shape)
    array = bfloat16_bits_to_float32(array) if wd.name == "bfloat16" else array.astype(wd.storage.newbyteorder("="))
    if finite and wd.name in FLOAT_DTYPES and not np.isfinite(array).all():
        raise PayloadError(f"{what}: holds NaN or infinite values", "non_finite")
    return array


def encode_tensors(arrays: Sequence[np.ndarray], dtype: str | None = None) -> bytes:
    """An ELTS payload: count, then each ELT1 payload prefixed by its byte length."""
    if not 1 <= len(arrays) <= MAX_SET_COUNT:
        raise PayloadError(f"a tensor set holds 1..{MAX_SET_COUNT} tensors, not {len(arrays)}", "bad_count")
    parts = [SET_MAGIC, _U32.pack(len(arrays))]
    for a in arrays:
        payload = encode_tensor(a, dtype)
        parts += [_U32.pack(len(payload)), payload]
    return b"".join(parts)


def decode_tensors(data: bytes | memoryview, *, count: int | None = None, allowed: Sequence[str] | None = None,
                   ndim: int | None = None, finite: bool = False) -> list[np.ndarray]:
    """Parse and validate an ELTS payload; `count` (if given) is the exact number of tensors expected."""
    buf = memoryview(data).cast("B")
    if len(buf) < 8:
        raise PayloadError(f"tensor set: payload of {len(buf)} bytes is shorter than its 8-byte header", "truncated")
    if bytes(buf[:4]) != SET_MAGIC:
        raise PayloadError(f"tensor set: bad magic {bytes(buf[:4])!r}, expected {SET_MAGIC!r}", "bad_magic")
    (n,) = _U32.unpack_from(buf, 4)
    if not 1 <= n <= MAX_SET_COUNT or (count is not None and n != count):
        want = str(count) if count is not None else f"1..{MAX_SET_COUNT}"
        raise PayloadError(f"tensor set: holds {n} tensors, expected {want}", "bad_count")
    out, offset = [], 8
    for i in range(n):
        if offset + 4 > len(buf):
            raise PayloadError(f"tensor set: ends before tensor {i} of {n}", "truncated")
        (size,) = _U32.unpack_from(buf, offset)
        offset += 4
        if offset + size > len(buf):
            raise PayloadError(f"tensor set: tensor {i} claims {size} bytes, {len(buf) - offset} remain", "truncated")
        out.append(decode_tensor(buf[offset:offset + size], allowed=allowed, ndim=ndim, finite=finite,
                                 what=f"tensor {i} of {n}"))
        offset += size
    if offset != len(buf):
        raise PayloadError(f"tensor set: {len(buf) - offset} trailing bytes after {n} tensors", "length_mismatch")
    return out
