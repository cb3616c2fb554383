"""Canonical tensor names (GGUF's) and their Hugging Face equivalents, as data."""

from __future__ import annotations

from edgellm.model.config import ModelConfig

# canonical template -> Hugging Face template; {i} is the layer index.
LAYER_TENSORS: dict[str, str] = {
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# The linear layers of one block, in the order a compression plan lists them.
LINEAR_ROLES: tuple[str, ...] = (
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture needs, in numpy order (out_features, in_features); per-layer head
    counts and FFN sizes (a structurally pruned model) come from the config's per-layer fields."""
    h = config.hidden_size
    shapes = {"token_embd.weight": (config.vocab_size, h), "output_norm.weight": (h,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, h)
    for i in range(config.n_layers):
        q, kv, f = config.q_size_at(i), config.kv_size_at(i), config.ffn_size_at(i)
        per_layer = {
            "attn_norm.weight": (h,),
            "attn_q.weight": (q, h),
            "attn_k.weight": (kv, h),
            "attn_v.weight": (kv, h),
            "attn_output.weight": (h, q),
            "ffn_norm.weight": (h,),
            "ffn_gate.weight": (f, h),
            "ffn_up.weight": (f, h),
            "ffn_down.weight": (h, f),
        }
        for suffix, shape in per_layer.items():
            shapes[f"blk.{i}.{suffix}"] = shape
    return shapes


def hf_name(canonical: str) -> str:
    """Map a canonical name to the Hugging Face Llama name."""
    if canonical in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[canonical]
    parts = canonical.split(".", 2)  # blk, i, rest
    template = "blk.{i}." + parts[2]
    return LAYER_TENSORS[template].format(i=parts[1])
