"""Lower the one Llama model description to an ONNX graph for ONNX Runtime's CPU provider.

One graph serves prefill (sequence > 1) and decode (sequence 1). The KV cache is a graph input and
output per layer in GroupQueryAttention's BNSH layout; the runtime binds each layer's past and present
to the same preallocated buffer, so a token appends in place instead of copying the cache.

Inside, the residual stream is 2-D (batch x sequence tokens, hidden): every op but attention is per
token, and 2-D rows let a Q4_1 offset correction end in one Gemm (C input = the int4 product) instead
of MatMul + Add, one node fewer per linear. Attention sees the 3-D view through the `seq_shape` tensor.

Graph inputs                         shape
  input_ids                          (batch, sequence) int64
  past_key_values.{i}.key/.value     (batch, n_kv_heads of layer i, cache_sequence, head_dim) float32
  seqlens_k                          (batch,) int32 = tokens in cache after this step - 1
  total_sequence_length              () int32 = tokens in cache after this step
  logits_to_keep                     (1,) int64 = how many trailing positions get logits
Graph outputs
  logits                             (batch, logits_to_keep, vocab)
  present.{i}.key/.value             (batch, n_kv_heads, cache_sequence, head_dim)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgellm.errors import missing_extra

try:
    import onnx
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("onnx", "ort") from exc

from edgellm.errors import ConfigError
from edgellm.export.block_formats import BlockQuantized, interleave_x8
from edgellm.export.onnx_builder import EDGELLM_DOMAIN, FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder
from edgellm.model.config import ModelConfig

OPSET = 23  # RMSNormalization
OFFSET_SUMS = ("reducesum", "matmul", "drop")
BLOCK_KERNELS = ("edgellm", "matmulnbits")
SEQ_SHAPE = "seq_shape"  # int64 [batch, sequence, -1]: the 3-D view of the 2-D token rows
Weight = BlockQuantized | np.ndarray  # fp32 arrays are (N, K) like the model description


@dataclass(frozen=True)
class LoweringOptions:
    accuracy_level: int = 4  # MatMulNBits: 0 = fp32 activations (exact), 4 = int8 activations (fast)
    lm_head_accuracy_level: int = 4
    fuse_qkv: bool = True
    fuse_gate_up: bool = True
    offset_sums: str = "reducesum"  # block sums of x: "reducesum" or "matmul" (x @ E); "drop" = timing ablation
    # GGUF blocks kept as the file has them: "edgellm" = edgellm's BlockMatMul/BlockGather custom ops
    # (exact Q4_1 at full speed, needs edgellm's kernel library); "matmulnbits" = stock ONNX Runtime ops
    # only (MatMulNBits + offset correction; portable to any ONNX Runtime build, the browser's included)
    block_kernel: str = "edgellm"

    def __post_init__(self) -> None:
        if self.offset_sums not in OFFSET_SUMS:
            raise ConfigError(f"offset_sums {self.offset_sums!r} unknown; valid: {', '.join(OFFSET_SUMS)}")
        if self.block_kernel not in BLOCK_KERNELS:
            raise ConfigError(f"block_kernel {self.block_kernel!r} unknown; valid: {', '.join(BLOCK_KERNELS)}")
        for key in ("accuracy_level", "lm_head_accuracy_level"):
            if getattr(self, key) not in (0, 1, 2, 3, 4):
                raise ConfigError(f"{key} must be 0-4, found {getattr(self, key)}")


def _concat_weights(parts: list[Weight]) -> Weight | None:
    """Stack weights along N when they share a format; None when they cannot be fused."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=0)
    if not all(isinstance(p, BlockQuantized) for p in parts):
        return None
    first = parts[0]
    same = all((p.bits, p.block_size, p.zero_point, p.k, p.block_offsets is None)
               == (first.bits, first.block_size, first.zero_point, first.k, first.block_offsets is None)
               for p in parts)
    if not same:
        return None
    same_file_type = all(p.gguf is not None and p.gguf_type == first.gguf_type for p in parts)
    if not same_file_type and any(p.gguf is not None for p in parts):
        return None  # some parts keep their file blocks (BlockMatMul), others not: lowered one by one
    offsets = None if first.block_offsets is None else np.concatenate([p.block_offsets for p in parts], axis=1)
    return BlockQuantized(
        n=sum(p.n for p in parts), k=first.k, bits=first.bits, block_size=first.block_size,
        packed=np.concatenate([p.packed for p in parts]), scales=np.concatenate([p.scales for p in parts]),
        zero_point=first.zero_point, block_offsets=offsets, source=first.source,
        gguf=np.concatenate([p.gguf for p in parts]) if same_file_type else None,
        gguf_type=first.gguf_type if same_file_type else "",
    )


def uses_block_kernel(w: Weight, options: LoweringOptions, accuracy_level: int = 4) -> bool:
    """BlockMatMul quantizes activations to int8 per block (accuracy level 4); a plan asking for fp32
    activations (level 0, exact) keeps MatMulNBits. BlockGather (the embedding) is exact either way."""
    return (options.block_kernel == "edgellm" and isinstance(w, BlockQuantized) and w.gguf is not None
            and accuracy_level == 4)


# block_kernel "edgellm", weights still the file's GGUF blocks:  x ──► BlockMatMul(x8 blocks) ──► y
# otherwise:
# x (M, K) ──► MatMulNBits(packed, scales) ───────────────────────► Gemm(S, C) + y ──► y (M, N)
#  └──► Reshape(M, K/32, 32) ──► ReduceSum ──► S (M, K/32) ─────────┘   (only Q4_1-style offsets;
#        block sums of x                                  C: (K/32, N)     x is 2-D rows there)
def linear(b: GraphBuilder, x: str, w: Weight, name: str, accuracy_level: int,
           options: LoweringOptions = LoweringOptions()) -> str:
    """y = x @ W^T for W in any supported storage; exact to fp32 rounding for transcoded blocks."""
    if isinstance(w, np.ndarray):
        return b.op1("MatMul", [x, b.const(f"{name}.weight_t", w.T.astype(np.float32))], name=name)
    if uses_block_kernel(w, options, accuracy_level):
        return b.op1("BlockMatMul", [x, b.const(f"{name}.{w.gguf_type.lower()}_x8", interleave_x8(w.gguf, w.gguf_type))],
                     name=name, domain=EDGELLM_DOMAIN, K=w.k, N=w.n, format=w.gguf_type)
    offset_sums = options.offset_sums
    y = b.op1("MatMulNBits", [x, b.const(f"{name}.qweight", w.packed), b.const(f"{name}.scales", w.scales)],
              name=name, domain=MS_DOMAIN, K=w.k, N=w.n, bits=w.bits, block_size=w.block_size,
              accuracy_level=accuracy_level)
    if w.block_offsets is None or offset_sums == "drop":  # "drop": speed ablation only, NOT the model's weights
        return y
    if offset_sums == "reducesum":
        shape = b.const(f"shape_blocks_{w.k}_{w.block_size}", np.array([-1, w.k // w.block_size, w.block_size], np.int64))
        blocks = b.op1("Reshape", [x, shape], name=f"{name}/blocks")
        sums = b.op1("ReduceSum", [blocks, b.const("axes_last", np.array([-1], np.int64))], name=f"{name}/block_sums",
                     keepdims=0)
    else:
        sums = b.op1("MatMul", [x, b.const(f"block_sum_{w.k}_{w.block_size}", _block_indicator(w.k, w.block_size))],
                     name=f"{name}/block_sums")
    return b.op1("Gemm", [sums, b.const(f"{name}.block_offsets", w.block_offsets), y], name=f"{name}/add_offset")


def _block_indicator(k: int, block: int) -> np.ndarray:
    e = np.zeros((k, k // block), dtype=np.float32)
    e[np.arange(k), np.arange(k) // block] = 1.0
    return e


# ids ─► Gather(q8 rows) ─► Cast ─► Sub(zero point) ─► Mul ◄─ Unsqueeze ◄─ Gather(scales)
#                                                       └─► [+ offsets] ─► Reshape(tokens, hidden)
def embedding(b: GraphBuilder, ids: str, w: Weight, hidden: int, options: LoweringOptions = LoweringOptions(),
              level: int = 4) -> str:
    """Token rows (batch x sequence, hidden), gathered straight from the quantized blocks: only the
    looked-up rows are widened. BlockGather when the (tied) lm_head's level uses the block kernel, so an
    fp32-activation plan stays in stock ops."""
    rows_2d = b.const("shape_rows_hidden", np.array([-1, hidden], np.int64))
    if uses_block_kernel(w, options, level):  # ids ─► BlockGather(x8 blocks; a tied lm_head's bytes) ─► Reshape(rows)
        # the same bytes as a tied lm_head's BlockMatMul weights: the data file stores them once
        table = b.const(f"token_embd.{w.gguf_type.lower()}_x8", interleave_x8(w.gguf, w.gguf_type))
        rows = b.op1("BlockGather", [ids, table], name="embed", domain=EDGELLM_DOMAIN, K=w.k, N=w.n,
                     format=w.gguf_type)
        return b.op1("Reshape", [rows, rows_2d], name="embed/rows_2d")
    if isinstance(w, np.ndarray):
        table = b.op1("Gather", [b.const("token_embd.weight", w.astype(np.float32)), ids], name="embed")
        return b.op1("Reshape", [table, rows_2d], name="embed/rows_2d")
    if w.bits not in (4, 8):
        raise ConfigError(f"quantized embeddings are gathered from 4- or 8-bit blocks, found {w.bits}-bit")
    # A separate initializer from the lm_head's on purpose: ONNX Runtime prepacks the lm_head into its own
    # layout and frees the original only when nothing else reads it; the gather touches just a few rows.
    rows = b.op1("Gather", [b.const(f"token_embd.q{w.bits}", w.packed), ids], name="embed/rows")  # (B,S,nb,bs*b/8)
    if w.bits == 4:
        rows = _nibbles(b, rows, w.block_size)
    values = b.op1("Cast", [rows], name="embed/cast", to=FLOAT)
    centered = b.op1("Sub", [values, b.const("embed.zero_point", np.float32(w.zero_point))], name="embed/center")
    axes = b.const("axes_last", np.array([-1], np.int64))
    scales = b.op1("Gather", [b.const("token_embd.scales", w.scales), ids], name="embed/scales")  # (B,S,nb)
    scales = b.op1("Unsqueeze", [scales, axes], name="embed/unsq")
    scaled = b.op1("Mul", [centered, scales], name="embed/scale")
    if w.block_offsets is not None:
        offsets = b.op1("Gather", [b.const("token_embd.offsets", np.ascontiguousarray(w.block_offsets.T)), ids],
                        name="embed/offsets")  # (B,S,nb)
        offsets = b.op1("Unsqueeze", [offsets, axes], name="embed/unsq_offsets")
        scaled = b.op1("Add", [scaled, offsets], name="embed/add_offset")
    return b.op1("Reshape", [scaled, rows_2d], name="embed/reshape")


# ids (batch, sequence) or hidden (batch, sequence, H) ─► Shape(end=2) ─► Concat([-1]) ─► seq_shape
def sequence_shape(b: GraphBuilder, source: str) -> str:
    """[batch, sequence, -1]: reshapes the 2-D token rows back to the 3-D tensors attention takes."""
    dims = b.op1("Shape", [source], name="embed/shape", end=2)
    return b.op1("Concat", [dims, b.const("minus_one", np.array([-1], np.int64))], outputs=[SEQ_SHAPE],
                 name="embed/seq_shape", axis=0)


# packed (B,S,nb,bs/2) ─► BitShift(<<4) ─► BitShift(>>4) = low nibbles ─► Unsqueeze ─┐
#        └────────────► BitShift(>>4) = high nibbles ────────────────► Unsqueeze ─► Concat(-1) ─► Reshape(B,S,nb,bs)
def _nibbles(b: GraphBuilder, packed: str, block_size: int) -> str:
    """uint8 codes, element 2i from the low nibble and 2i+1 from the high one (block_formats.pack)."""
    four = b.const("u8_four", np.array(4, np.uint8))
    axes = b.const("axes_last", np.array([-1], np.int64))
    shifted = b.op1("BitShift", [packed, four], name="embed/shl", direction="LEFT")
    low = b.op1("BitShift", [shifted, four], name="embed/low", direction="RIGHT")
    high = b.op1("BitShift", [packed, four], name="embed/high", direction="RIGHT")
    pair = b.op1("Concat", [b.op1("Unsqueeze", [low, axes], name="embed/unsq_low"),
                            b.op1("Unsqueeze", [high, axes], name="embed/unsq_high")], name="embed/pair", axis=-1)
    shape = b.const(f"shape_bs_nb_{block_size}", np.array([0, 0, -1, block_size], np.int64))
    return b.op1("Reshape", [pair, shape], name="embed/codes")


# qkv rows (B*S,(Hq+2Hkv)d) ─► Reshape(seq_shape) ─► GroupQueryAttention(rotary, packed QKV) ─► Reshape ─► (B*S, Hq d)
#                  past k/v (B,Hkv,L,d) ─────────────────┘        └─► present k/v (same buffer as past when bound so)
def attention(b: GraphBuilder, cfg: ModelConfig, i: int, qkv: str, seqlens: str, total: str,
              cos: str, sin: str) -> str:
    qkv_3d = b.op1("Reshape", [qkv, SEQ_SHAPE], name=f"blk.{i}.attention/to_3d")
    out = b.op(
        "GroupQueryAttention",
        [qkv_3d, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, cos, sin],
        outputs=[f"attn_out.{i}", f"present.{i}.key", f"present.{i}.value"], name=f"blk.{i}.attention",
        domain=MS_DOMAIN, num_heads=cfg.n_heads_at(i), kv_num_heads=cfg.n_kv_heads_at(i), do_rotary=1,
        rotary_interleaved=1 if cfg.rope_style == "interleaved" else 0,
    )
    rows = b.const(f"shape_rows_{cfg.n_heads_at(i) * cfg.head_dim}", np.array([-1, cfg.n_heads_at(i) * cfg.head_dim], np.int64))
    return b.op1("Reshape", [out[0], rows], name=f"blk.{i}.attention/to_rows")


# gate_up rows (B*S,2F) ─► Split ─► g ─► Sigmoid ─► Mul(g) ─► Mul(u) ─► (B*S,F)
#                          └─► u ──────────────────────────┘
def swiglu(b: GraphBuilder, gate_up: str, ffn: int, name: str) -> str:
    g, u = b.op("Split", [gate_up, b.const(f"split_{ffn}", np.array([ffn, ffn], np.int64))], n_out=2,
                name=f"{name}/split", axis=-1)
    return _silu_times(b, g, u, name)


def _silu_times(b: GraphBuilder, g: str, u: str, name: str) -> str:
    sig = b.op1("Sigmoid", [g], name=f"{name}/sigmoid")
    silu = b.op1("Mul", [g, sig], name=f"{name}/silu")
    return b.op1("Mul", [silu, u], name=f"{name}/gate")


# x ─► SkipSimplifiedLayerNorm(skip = residual) ─► normed      (first layer: RMSNormalization)
#                                  └──────────────► residual + x  (the next skip input)
def skip_norm(b: GraphBuilder, x: str, residual: str | None, gamma: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    g = b.const(f"{name}.weight", gamma.astype(np.float32))
    if residual is None:
        return b.op1("RMSNormalization", [x, g], name=name, axis=-1, epsilon=eps, stash_type=1), x
    outs = b.op("SkipSimplifiedLayerNormalization", [x, residual, g], name=name, domain=MS_DOMAIN,
                outputs=[f"{name}/out", "", "", f"{name}/sum"], epsilon=eps)
    return outs[0], outs[3]


def rope_tables(cfg: ModelConfig, inv_freq: np.ndarray, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (P, d/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_llama_graph(cfg: ModelConfig, norms: Mapping[str, np.ndarray], linears: Mapping[str, Weight],
                      embed: Weight, lm_head: Weight, inv_freq: np.ndarray,
                      options: LoweringOptions = LoweringOptions()) -> onnx.ModelProto:
    """The whole decoder: embedding -> n_layers blocks -> final norm -> lm_head on the kept positions."""
    b = GraphBuilder()
    ids = b.add_input("input_ids", INT64, ["batch", "sequence"])
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            b.add_input(f"past_key_values.{i}.{kind}", FLOAT, ["batch", cfg.n_kv_heads_at(i), "cache_sequence", cfg.head_dim])
    seqlens = b.add_input("seqlens_k", INT32, ["batch"])
    total = b.add_input("total_sequence_length", INT32, [])
    keep = b.add_input("logits_to_keep", INT64, [1])
    cos_t, sin_t = rope_tables(cfg, inv_freq, cfg.context_length)
    cos, sin = b.const("rope.cos", cos_t), b.const("rope.sin", sin_t)

    x = embedding(b, ids, embed, cfg.hidden_size, options, options.lm_head_accuracy_level)
    sequence_shape(b, ids)
    residual: str | None = None
    for i in range(cfg.n_layers):
        x, residual = _block(b, cfg, i, x, residual, norms, linears, seqlens, total, cos, sin, options)
    h, _ = skip_norm(b, x, residual, norms["output_norm"], cfg.norm_eps, "output_norm")
    logits = _kept_logits(b, h, keep, lm_head, cfg, options)
    b.op1("Identity", [logits], outputs=["logits"], name="logits/out")
    b.add_output("logits", FLOAT, ["batch", "logits_len", cfg.vocab_size])
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            b.add_output(f"present.{i}.{kind}", FLOAT, ["batch", cfg.n_kv_heads_at(i), "present_sequence", cfg.head_dim])
    return b.model("edgellm_llama", OPSET)


# rows (B*S, H) ─► Reshape(seq_shape) ─► Slice(last `keep` positions) ─► Shape(end=2) ─► Concat([V]) ──┐
#                                             └─► Reshape(rows) ─► linear(lm_head) ─► Reshape ◄─────────┘ (B, keep, V)
def _kept_logits(b: GraphBuilder, h: str, keep: str, lm_head: Weight, cfg: ModelConfig, options: LoweringOptions) -> str:
    """The lm_head on the last `keep` positions of each sequence only (decode keeps 1)."""
    h3 = b.op1("Reshape", [h, SEQ_SHAPE], name="logits/to_3d")
    neg_keep = b.op1("Neg", [keep], name="logits/neg_keep")
    kept = b.op1("Slice", [h3, neg_keep, b.const("int64_max", np.array([2**62], np.int64)),
                           b.const("axis_seq", np.array([1], np.int64))], name="logits/keep")
    rows = b.op1("Reshape", [kept, b.const("shape_rows_hidden", np.array([-1, cfg.hidden_size], np.int64))],
                 name="logits/rows")
    flat = linear(b, rows, lm_head, "lm_head", options.lm_head_accuracy_level, options)
    dims = b.op1("Shape", [kept], name="logits/shape", end=2)
    shape = b.op1("Concat", [dims, b.const("vocab_dim", np.array([cfg.vocab_size], np.int64))], name="logits/out_shape",
                  axis=0)
    return b.op1("Reshape", [flat, shape], name="logits/to_3d_out")


# x, residual ─► SkipSimplifiedLayerNorm(attn_norm) ─► linear(QKV fused) ─► GroupQueryAttention ─► linear(o)
#                        │ residual + x                                                            │
#                        └──────────────► SkipSimplifiedLayerNorm(ffn_norm) ◄─────────────────────┘
#                                           │ normed              └─► residual (to the next layer)
#                                           └─► linear(gate|up fused) ─► SwiGLU ─► linear(down) ─► x (next layer)
def _block(b: GraphBuilder, cfg: ModelConfig, i: int, x: str, residual: str | None,
           norms: Mapping[str, np.ndarray], linears: Mapping[str, Weight], seqlens: str, total: str,
           cos: str, sin: str, options: LoweringOptions) -> tuple[str, str]:
    """One decoder layer; returns (ffn output, residual stream) for the next SkipSimplifiedLayerNorm."""
    p = f"blk.{i}"
    h, residual = skip_norm(b, x, residual, norms[f"{p}.attn_norm"], cfg.norm_eps, f"{p}.attn_norm")
    qkv = _fused(b, h, [linears[f"{p}.attn_q"], linears[f"{p}.attn_k"], linears[f"{p}.attn_v"]],
                 f"{p}.attn_qkv", options.fuse_qkv, options)
    attn = attention(b, cfg, i, qkv, seqlens, total, cos, sin)
    o = linear(b, attn, linears[f"{p}.attn_output"], f"{p}.attn_output", options.accuracy_level, options)
    h, residual = skip_norm(b, o, residual, norms[f"{p}.ffn_norm"], cfg.norm_eps, f"{p}.ffn_norm")
    gate, up = linears[f"{p}.ffn_gate"], linears[f"{p}.ffn_up"]
    fused = _concat_weights([gate, up]) if options.fuse_gate_up else None
    if fused is not None:
        act = swiglu(b, linear(b, h, fused, f"{p}.ffn_gate_up", options.accuracy_level, options), cfg.ffn_size_at(i), f"{p}.ffn")
    else:
        g = linear(b, h, gate, f"{p}.ffn_gate", options.accuracy_level, options)
        u = linear(b, h, up, f"{p}.ffn_up", options.accuracy_level, options)
        act = _silu_times(b, g, u, f"{p}.ffn")
    return linear(b, act, linears[f"{p}.ffn_down"], f"{p}.ffn_down", options.accuracy_level, options), residual


def _fused(b: GraphBuilder, x: str, parts: list[Weight], name: str, fuse: bool, options: LoweringOptions) -> str:
    fused = _concat_weights(parts) if fuse else None
    if fused is not None:
        return linear(b, x, fused, name, options.accuracy_level, options)
    outs = [linear(b, x, w, f"{name}/{j}", options.accuracy_level, options) for j, w in enumerate(parts)]
    return b.op1("Concat", outs, name=f"{name}/concat", axis=-1)
