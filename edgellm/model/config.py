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

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
