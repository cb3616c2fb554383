"""Weights in ONNX Runtime's block-quantized layout (MatMulNBits), transcoded from GGUF blocks, and
the GGUF blocks themselves for edgellm's own BlockMatMul (`gguf`, reordered by `interleave_x8`).

MatMulNBits computes with w = scale * (q - zero_point) per block of `block_size` along K, q unsigned
`bits`-bit integers packed low bits first. GGUF's types map onto it as follows:

  Q4_0  w = d * (q - 8)      -> 4-bit, scale d, zero point 8             exact
  Q8_0  w = d * q (int8)     -> 8-bit, scale d, zero point 128, q + 128  exact
  Q4_1  w = d * q + m        -> 4-bit, scale d, zero point 8, plus a per-block offset
                                 c = m + 8 d that the graph adds as (block sums of x) @ c   exact

Q4_1's float minimum has no integer zero point; a float zero point is exact but leaves ORT's fast
kernel (~40x slower, shared/notes/baselines.md). Splitting it into the symmetric 4-bit product plus a
rank-(K/32) correction keeps both: the weights the graph multiplies by are d*q + m to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgellm.errors import ConfigError, UnsupportedTensorTypeError
from edgellm.model.weights import WeightTensor

GGUF_BLOCK = 32
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per block of 32: f16 d (, f16 m), the codes


@dataclass
class BlockQuantized:
    """One linear layer's weights (N outputs x K inputs) in MatMulNBits form (+ its GGUF blocks if any)."""

    n: int
    k: int
    bits: int
    block_size: int
    packed: np.ndarray  # uint8 (N, K/block, block*bits/8)
    scales: np.ndarray  # float32 (N, K/block)
    zero_point: int  # uniform integer zero point (the kernel's default: 2^(bits-1))
    block_offsets: np.ndarray | None = None  # float32 (K/block, N): Q4_1's m + 8d, else None
    source: str = ""  # e.g. "Q4_1 transcode", "int4 RTN"
    gguf: np.ndarray | None = None  # uint8 (N, K/32 * block bytes): the file's own blocks, when transcoded
    gguf_type: str = ""  # "Q4_0", "Q4_1" or "Q8_0" with `gguf`

    def dequantize(self) -> np.ndarray:
        """float32 (N, K): what the exported graph multiplies by (for tests and fallbacks)."""
        q = unpack(self.packed, self.bits).reshape(self.n, self.k // self.block_size, self.block_size)
        w = (q.astype(np.float32) - self.zero_point) * self.scales[:, :, None]
        if self.block_offsets is not None:
            w = w + self.block_offsets.T[:, :, None]
        return w.reshape(self.n, self.k)

    def rows(self, start: int, stop: int) -> BlockQuantized:
        """Output rows [start, stop) (un-fusing a fused group such as Q|K|V)."""
        offsets = None if self.block_offsets is None else self.block_offsets[:, start:stop].copy()
        gguf = None if self.gguf is None else self.gguf[start:stop].copy()
        return BlockQuantized(stop - start, self.k, self.bits, self.block_size, self.packed[start:stop].copy(),
                              self.scales[start:stop].copy(), self.zero_point, offsets, self.source,
                              gguf, self.gguf_type)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.block_offsets is None else self.block_offsets.nbytes
        return self.packed.nbytes + self.scales.nbytes + extra

    @property
    def stored_nbytes(self) -> int:
        """Bytes as a file holds them: codes + one fp16 scale (+ one fp16 minimum) per block, the GGUF
        convention (quantize_rtn and GPTQ choose fp16-representable scales and minima, so it is exact)."""
        per_block = 2 if self.block_offsets is None else 4
        return self.packed.nbytes + per_block * self.scales.size


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(..., K) unsigned ints -> (..., K*bits/8) uint8: a little-endian bit stream (element i in bits
    [bits*i, bits*i + bits)), so element 2i sits in the low nibble for 4 bits. 3 bits: K a multiple of 8."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if bits == 4:
        return (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)
    if bits == 2:
        return (q[..., 0::4] & 3) | ((q[..., 1::4] & 3) << 2) | ((q[..., 2::4] & 3) << 4) | ((q[..., 3::4] & 3) << 6)
    if bits == 3:
        if q.shape[-1] % 8:
            raise ConfigError(f"3-bit packing needs a multiple of 8 values per row, found {q.shape[-1]}")
        stream = (q[..., None] >> np.arange(3, dtype=np.uint8)) & 1  # (..., K, 3) bits, low first
        return np.packbits(stream.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")
    raise ConfigError(f"block packing supports 2, 3, 4 and 8 bits, not {bits}")


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed.astype(np.uint8)
    if bits == 3:
        stream = np.unpackbits(packed, axis=-1, bitorder="little")
        groups = stream.reshape(*packed.shape[:-1], -1, 3)
        return (groups[..., 0] | (groups[..., 1] << 1) | (groups[..., 2] << 2)).astype(np.uint8)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _blocks(tensor: WeightTensor, bytes_per_block: int) -> np.ndarray:
    n, k = tensor.shape
    if k % GGUF_BLOCK:
        raise UnsupportedTensorTypeError(f"{tensor.name}: K={k} is not a multiple of {GGUF_BLOCK}")
    return np.asarray(tensor.raw, dtype=np.uint8).reshape(n, k // GGUF_BLOCK, bytes_per_block)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _gguf_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 4-bit blocks keep element j in the low nibble and j+16 in the high nibble of byte j."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def from_q4_0(tensor: WeightTensor) -> BlockQuantized:
    b = _blocks(tensor, GGUF_BLOCK_BYTES["Q4_0"])
    q = _gguf_nibbles(b[..., 2:])
    n, k = tensor.shape
    return BlockQuantized(n, k, 4, GGUF_BLOCK, pack(q, 4), _f16(b, 0), 8, source="Q4_0 transcode",
                          gguf=b.reshape(n, -1), gguf_type="Q4_0")


def from_q4_1(tensor: WeightTensor) -> BlockQuantized:
    b = _blocks(tensor, GGUF_BLOCK_BYTES["Q4_1"])
    d, m = _f16(b, 0), _f16(b, 2)
    q = _gguf_nibbles(b[..., 4:])
    n, k = tensor.shape
    offsets = (m + 8.0 * d).T.copy()  # d*q + m = d*(q - 8) + (m + 8d)
    return BlockQuantized(n, k, 4, GGUF_BLOCK, pack(q, 4), d, 8, offsets, source="Q4_1 transcode",
                          gguf=b.reshape(n, -1), gguf_type="Q4_1")


def from_q8_0(tensor: WeightTensor) -> BlockQuantized:
    b = _blocks(tensor, GGUF_BLOCK_BYTES["Q8_0"])
    q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    n, k = tensor.shape
    return BlockQuantized(n, k, 8, GGUF_BLOCK, q, _f16(b, 0), 128, source="Q8_0 transcode",
                          gguf=b.reshape(n, -1), gguf_type="Q8_0")


LOSSLESS_TRANSCODERS = {"Q4_0": from_q4_0, "Q4_1": from_q4_1, "Q8_0": from_q8_0}


def _f16_values(x: np.ndarray) -> np.ndarray:
    """float32 values that fp16 holds exactly (nearest), never 0 or inf for a positive finite scale."""
    y = np.asarray(x, dtype=np.float32).astype(np.float16)
    tiny = np.float16(np.finfo(np.float16).smallest_subnormal)
    y = np.where((x > 0) & (y == 0), tiny, y)
    return np.clip(y, -np.finfo(np.float16).max, np.finfo(np.float16).max).astype(np.float32)


def rtn_grid(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(scales, minima or None) per block of `blocks` (..., block): the one grid rule RTN and GPTQ share.
    Both are fp16 values, so a file stores them in 2 bytes each with no loss (as GGUF does)."""
    zero, qmax = 1 << (bits - 1), (1 << bits) - 1
    if symmetric:
        amax = np.abs(blocks).max(-1)
        return _f16_values(np.where(amax > 0, amax / (zero - 1), 1.0)), None  # [-(z-1), z-1]
    lo = _f16_values(blocks.min(-1))
    hi = blocks.max(-1)
    return _f16_values(np.where(hi > lo, (hi - lo) / qmax, 1.0)), lo


def quantize_rtn(weights: np.ndarray, bits: int, block_size: int = 32, symmetric: bool = True) -> BlockQuantized:
    """Round-to-nearest block quantization of float weights (N, K) with a uniform zero point."""
    n, k = weights.shape
    if k % block_size:
        raise ConfigError(f"K={k} is not a multiple of block size {block_size}")
    w = weights.reshape(n, k // block_size, block_size).astype(np.float32)
    zero = 1 << (bits - 1)
    qmax = (1 << bits) - 1
    scales, lo = rtn_grid(w, bits, symmetric)
    if lo is None:
        q = np.clip(np.round(w / scales[..., None]) + zero, 0, qmax)
        return BlockQuantized(n, k, bits, block_size, pack(q, bits).reshape(n, k // block_size, -1),
                              scales, zero, source=f"int{bits} RTN symmetric")
    q = np.clip(np.round((w - lo[..., None]) / scales[..., None]), 0, qmax)
    offsets = (lo + zero * scales).T.astype(np.float32).copy()  # asymmetric via the same offset path
    return BlockQuantized(n, k, bits, block_size, pack(q, bits).reshape(n, k // block_size, -1), scales,
                          zero, offsets, source=f"int{bits} RTN asymmetric")


def quantize_format(weights: np.ndarray, fmt: str) -> BlockQuantized:
    """Round-to-nearest of float weights (N, K) in any named plan format (edgellm.compress.plan.QUANT_FORMATS),
    e.g. "int3-sym-g128": 3 bits, symmetric, one scale per 128 weights."""
    from edgellm.compress.plan import QUANT_FORMATS

    if fmt not in QUANT_FORMATS:
        raise ConfigError(f"{fmt!r} is not a round-to-nearest format; valid: {', '.join(QUANT_FORMATS)}")
    spec = QUANT_FORMATS[fmt]
    return quantize_rtn(weights, spec.bits, spec.group, symmetric=spec.symmetric)


_SCALE_FIELDS = {"Q4_0": 1, "Q4_1": 2, "Q8_0": 1}  # f16 fields before the codes: d (, m)


def interleave_x8(blocks: np.ndarray, gguf_type: str) -> np.ndarray:
    """GGUF blocks (N, K/32 * bytes) -> edgellm's BlockMatMul "x8" layout (ceil(N/8), K/32 * 8 * bytes).

    Rows go in groups of 8 (the last one zero-padded); per group and block the 8 rows' f16 scales come
    first (then Q4_1's 8 minima), then the 8 rows' codes, so a kernel converts 8 scales with one load.
    Byte-for-byte the same values as the file: only their order changes."""
    if gguf_type not in GGUF_BLOCK_BYTES:
        raise ConfigError(f"x8 layout is defined for {', '.join(GGUF_BLOCK_BYTES)}, not {gguf_type}")
    bpb = GGUF_BLOCK_BYTES[gguf_type]
    n = blocks.shape[0]
    b = np.asarray(blocks, dtype=np.uint8).reshape(n, -1, bpb)
    nb = b.shape[1]
    groups = -(-n // 8)
    padded = np.zeros((groups * 8, nb, bpb), dtype=np.uint8)
    padded[:n] = b
    g = padded.reshape(groups, 8, nb, bpb).transpose(0, 2, 1, 3)  # (G, nb, 8 rows, bpb)
    head = 2 * _SCALE_FIELDS[gguf_type]
    fields = [g[..., 2 * f:2 * f + 2].reshape(groups, nb, 16) for f in range(_SCALE_FIELDS[gguf_type])]
    codes = g[..., head:].reshape(groups, nb, 8 * (bpb - head))
    return np.ascontiguousarray(np.concatenate(fields + [codes], axis=-1).reshape(groups, nb * 8 * bpb))


def _f16_exact(x: np.ndarray) -> np.ndarray | None:
    """x as fp16 if every value is one exactly, else None."""
    h = np.asarray(x, dtype=np.float32).astype(np.float16)
    return h if np.array_equal(h.astype(np.float32), x) else None


def with_gguf_blocks(bq: BlockQuantized) -> BlockQuantized:
    """`bq` with its GGUF blocks attached when its weights are exactly a GGUF type (so edgellm's
    BlockMatMul can run them): blocks of 32 with fp16 scales, 4-bit with zero point 8 (Q4_0; Q4_1 when
    the fp32 offsets are m + 8d for an fp16 minimum m, as RTN and GPTQ make them) or symmetric 8-bit with
    zero point 128 (Q8_0). Anything else comes back unchanged and keeps MatMulNBits."""
    if bq.gguf is not None or bq.block_size != GGUF_BLOCK or (bq.bits, bq.zero_point) not in ((4, 8), (8, 128)):
        return bq
    d = _f16_exact(bq.scales)
    if d is None:
        return bq
    n, nb = bq.n, bq.k // GGUF_BLOCK
    q = unpack(bq.packed.reshape(n, nb, -1), bq.bits).reshape(n, nb, GGUF_BLOCK)
    fields = [d.reshape(n, nb, 1).view(np.uint8)]
    if bq.bits == 8:
        if bq.block_offsets is not None:
            return bq
        gguf_type, codes = "Q8_0", (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:
        gguf_type = "Q4_0"
        if bq.block_offsets is not None:
            m = _f16_exact(bq.block_offsets.T - np.float32(8) * bq.scales)
            if m is None or not np.array_equal(m.astype(np.float32) + np.float32(8) * bq.scales, bq.block_offsets.T):
                return bq
            gguf_type = "Q4_1"
            fields.append(m.reshape(n, nb, 1).view(np.uint8))
        codes = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)  # GGUF: element j low, j + 16 high nibble
    blocks = np.concatenate([*fields, codes], axis=-1).reshape(n, -1)
    return dataclasses.replace(bq, gguf=np.ascontiguousarray(blocks), gguf_type=gguf_type)
