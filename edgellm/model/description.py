"""A loaded model: config + weights + tokenizer data + where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import MissingTensorError, TensorShapeError
from edgellm.model.config import ModelConfig
from edgellm.model.tensor_names import expected_shapes
from edgellm.model.weights import ModelWeights


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer is built from; a GGUF stores exactly these fields in its metadata."""

    model: str  # "gpt2" (byte-level BPE) is what edgellm builds today
    pre: str  # pre-tokenizer name, e.g. "smollm", "llama3", "gpt2"
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
    merges: tuple[str, ...]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    extra_eos_ids: tuple[int, ...] = ()
    hf_json: str | None = None  # a Hugging Face tokenizer.json, used as-is when present


@dataclass
class ModelDescription:
    """The single description every backend and exporter consumes."""

    config: ModelConfig
    weights: ModelWeights
    tokenizer: TokenizerSpec | None
    source: Path
    file_type: str = ""  # e.g. "Q4_1" for the dominant GGUF tensor type
    metadata: dict[str, object] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every tensor the architecture needs is present with the right shape."""
        # checked first: a corrupt count (e.g. 4e9) must fail before every expected name is listed
        present = {int(p[1]) for p in (n.split(".", 2) for n in self.weights) if p[0] == "blk" and p[1].isdigit()}
        if self.config.n_layers > len(present):
            first_missing = min(set(range(len(present) + 1)) - present)
            raise MissingTensorError(
                f"{self.source}: the model config says {self.config.n_layers} layers (n_layers), but the file holds tensors "
                f"for {len(present)}; e.g. no tensors for blk.{first_missing}"
            )
        missing: list[str] = []
        wrong: list[str] = []
        for name, shape in expected_shapes(self.config).items():
            if name not in self.weights:
                missing.append(name)
            elif tuple(self.weights[name].shape) != shape:
                wrong.append(f"{name}: expected {shape}, found {tuple(self.weights[name].shape)}")
        if missing:
            raise MissingTensorError(
                f"{self.source}: {len(missing)} required tensor(s) missing, e.g. {', '.join(missing[:3])}"
            )
        if wrong:
            raise TensorShapeError(f"{self.source}: shape mismatch: " + "; ".join(wrong[:3]))

    def lm_head_name(self) -> str:
        return "token_embd.weight" if self.config.tie_embeddings else "output.weight"
