"""Allocation units: the groups of linear layers that must share one format.

The ONNX lowering fuses Q/K/V and gate/up into single matmuls, so a plan that gave them different
formats would lose the fusion. The allocator therefore chooses one format per unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.model.config import ModelConfig

# unit role -> (member roles, input features, output features) as functions of the config
UNIT_ROLES: dict[str, tuple[str, ...]] = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "attn_output": ("attn_output",),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_down": ("ffn_down",),
}


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. "blk.3.attn_qkv"
    layer: int
    role: str
    members: tuple[str, ...]  # linear names, e.g. ("blk.3.attn_q", "blk.3.attn_k", "blk.3.attn_v")
    k: int
    n: int
    auto_bytes: int | None = None  # stored bytes of the source's own tensors ("auto"), when known

    @property
    def n_weights(self) -> int:
        return self.k * self.n


def unit_shapes(config: ModelConfig, layer: int | None = None) -> dict[str, tuple[int, int]]:
    """(K, N) of each unit role as the graph runs it (Q|K|V and gate|up fused); with `layer`, that layer's
    own shapes (they differ per layer after structured pruning), else the config's global shapes."""
    if layer is None:
        q, kv, f = config.q_size, config.kv_size, config.ffn_size
    else:
        q, kv, f = config.q_size_at(layer), config.kv_size_at(layer), config.ffn_size_at(layer)
    return {
        "attn_qkv": (config.hidden_size, q + 2 * kv),
        "attn_output": (q, config.hidden_size),
        "ffn_gate_up": (config.hidden_size, 2 * f),
        "ffn_down": (f, config.hidden_size),
    }


def units(config: ModelConfig) -> list[Unit]:
    out = []
    for i in range(config.n_layers):
        shapes = unit_shapes(config, i)
        for role, members in UNIT_ROLES.items():
            k, n = shapes[role]
            out.append(Unit(f"blk.{i}.{role}", i, role, tuple(f"blk.{i}.{m}" for m in members), k, n))
    return out


def format_bytes(fmt: str, k: int, n: int, block: int = 32) -> int:
    """Bytes one K x N linear takes stored (packed weights + fp16 scales/minima, as GGUF; "auto" is the
    shipped Q4_1 source's own 20-byte blocks)."""
    blocks = k * n // block
    table = {
        "fp32": 4 * k * n,
        "int8": k * n + 2 * blocks,
        "int4": k * n // 2 + 4 * blocks,  # scale + minimum per block (also Q4_1's lossless transcode)
        "auto": k * n // 2 + 4 * blocks,
        "int4-sym": k * n // 2 + 2 * blocks,
        "int2": k * n // 4 + 4 * blocks,
    }
    if fmt not in table:
        from edgellm.errors import ConfigError

        raise ConfigError(f"no size rule for format {fmt!r}; valid: {', '.join(table)}")
    return table[fmt]
