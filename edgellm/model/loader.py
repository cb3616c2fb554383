"""One entry point: anything a user may name as MODEL -> ModelDescription."""

from __future__ import annotations

from pathlib import Path

from edgellm.errors import ModelFormatError
from edgellm.model.catalog import resolve_model_path
from edgellm.model.description import ModelDescription


def load_model(spec: str | Path | None = None) -> ModelDescription:
    """Load a GGUF file, a Hugging Face directory, or a model card id (None = the default model)."""
    path = resolve_model_path(spec)
    if path.is_dir():
        from edgellm.model.artifact import is_artifact, load_artifact

        if is_artifact(path):
            return load_artifact(path)
        if (path / "compressed.json").is_file():
            from edgellm.compress.pipeline import load_compressed

            return load_compressed(path)
        if (path / "config.json").is_file():
            from edgellm.model.hf_loader import load_hf_directory

            return load_hf_directory(path)
        if (path / "model.onnx").is_file():
            raise ModelFormatError(
                f"{path}: has model.onnx but no manifest.json: not an edgellm export (or an interrupted one)"
            )
        raise ModelFormatError(
            f"{path}: directory holds neither manifest.json (an edgellm export) nor config.json (Hugging Face)"
        )
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        from edgellm.model.gguf_loader import load_gguf

        return load_gguf(path)
    if path.suffix.lower() == ".safetensors":
        from edgellm.model.hf_loader import load_hf_directory

        return load_hf_directory(path.parent)
    raise ModelFormatError(f"{path}: unrecognised model format (expected .gguf or a Hugging Face directory)")


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"GGUF"
