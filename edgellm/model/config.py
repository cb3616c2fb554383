"""Architecture hyper-parameters of a Llama-family decoder, independent of file format."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from edgellm.errors import ConfigError

# "interleaved": rotate pairs (0,1), (2,3), ... -- what llama.cpp's LLAMA arch uses on GGUF weights,
# whose Q/K rows the converter permuted for it. "half": rotate (i, i + d/2) -- Hugging Face Llama.
RopeStyle = Literal["interleaved", "half"]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (none, linear, or llama3-style); factor 1.0 means no scaling."""

    kind: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    original_context: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "llama3"):
            raise ConfigError(f"rope scaling kind {self.kind!r} unsupported; valid: none, linear, llama3")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, found {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of the network; validated so a bad file fails here, not in a matmul."""

    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    vocab_size: int
    context_length: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_style: RopeStyle = "interleaved"
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    name: str = ""
    # Per-layer shapes after structured pruning; empty = every layer uses the global value above.
    layer_n_heads: tuple[int, ...] = ()
    layer_n_kv_heads: tuple[int, ...] = ()
    layer_ffn_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for key in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "ffn_size", "vocab_size",
                    "context_length"):
            value = getattr(self, key)
            if type(value) is not int or value <= 0:
                raise ConfigError(f"model config field {key} must be a positive integer, found {value!r}")
        if type(self.head_dim) is not int or self.head_dim < 0:
            raise ConfigError(f"model config field head_dim must be a non-negative integer, found {self.head_dim!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, found {self.head_dim}")
        if self.rope_style not in ("interleaved", "half"):
            raise ConfigError(f"rope_style {self.rope_style!r} unsupported; valid: interleaved, half")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps and rope_theta must be positive")
        self._check_layer_shapes()

    def _check_layer_shapes(self) -> None:
        for key in ("layer_n_heads", "layer_n_kv_heads", "layer_ffn_sizes"):
            values = getattr(self, key)
            if isinstance(values, (list, tuple)):
                object.__setattr__(self, key, tuple(values))  # JSON gives lists
                values = getattr(self, key)
            if not isinstance(values, tuple) or (values and len(values) != self.n_layers):
                raise ConfigError(f"model config field {key} must list one value per layer ({self.n_layers}) "
                                  f"or be empty, found {values!r:.80}")
            if any(type(v) is not int or v <= 0 for v in values):
                raise ConfigError(f"model config field {key} must hold positive integers, found {values!r:.80}")
        # Uniform models check once: a corrupt layer count (billions) must not cost a loop here.
        for i in range(self.n_layers) if (self.layer_n_heads or self.layer_n_kv_heads) else (0,):
            if self.n_heads_at(i) % self.n_kv_heads_at(i):
                raise ConfigError(f"layer {i}: n_heads {self.n_heads_at(i)} is not a multiple of "
                                  f"n_kv_heads {self.n_kv_heads_at(i)}")

    @property
    def uniform(self) -> bool:
        """True when every layer has the global shapes (no structured pruning)."""
        return not (self.layer_n_heads or self.layer_n_kv_heads or self.layer_ffn_sizes)

    def n_heads_at(self, layer: int) -> int:
        return self.layer_n_heads[layer] if self.layer_n_heads else self.n_heads

    def n_kv_heads_at(self, layer: int) -> int:
        return self.layer_n_kv_heads[layer] if self.layer_n_kv_heads else self.n_kv_heads

    def ffn_size_at(self, layer: int) -> int:
        return self.layer_ffn_sizes[layer] if self.layer_ffn_sizes else self.ffn_size

    def q_size_at(self, layer: int) -> int:
        return self.n_heads_at(layer) * self.head_dim

    def kv_size_at(self, layer: int) -> int:
        return self.n_kv_heads_at(layer) * self.head_dim

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
