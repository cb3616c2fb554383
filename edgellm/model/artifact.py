"""Exported artifact directories (model.onnx + manifest.json + tokenizer): read them as a model.

The manifest names the backend that runs the directory, the model config, the per-layer formats and
a sha256 of every file, so a damaged or mixed-up directory is caught before it is run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from edgellm.errors import ModelFormatError
from edgellm.model.config import ModelConfig, RopeScaling
from edgellm.model.description import ModelDescription, TokenizerSpec
from edgellm.model.weights import ModelWeights

MANIFEST = "manifest.json"
TOKENIZER_SPEC = "tokenizer_spec.json"
ARTIFACT_FORMAT = "edgellm-artifact"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelFormatError(f"{directory}: no {MANIFEST}; not an edgellm export (or an interrupted one)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ModelFormatError(f"{path}: format is not {ARTIFACT_FORMAT!r}")
    expected = {"backend": str, "config": dict, "files": dict, "graph": dict}
    for key, kind in expected.items():
        if key not in manifest:
            raise ModelFormatError(f"{path}: manifest field {key!r} is missing")
        if not isinstance(manifest[key], kind):
            raise ModelFormatError(
                f"{path}: manifest field {key!r} should be a {kind.__name__}, found {type(manifest[key]).__name__}"
            )
    for name, info in manifest["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise ModelFormatError(f"{path}: files[{name!r}] needs integer 'bytes' and string 'sha256', found {info!r}")
    for key in ("model", "external_data"):
        if not isinstance(manifest["graph"].get(key), str):
            raise ModelFormatError(f"{path}: manifest field graph.{key} should be a file name")
    for key, kind in (("layers", dict), ("plan", dict), ("model", dict)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise ModelFormatError(f"{path}: manifest field {key!r} should be a {kind.__name__}")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its recorded size and sha256."""
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ModelFormatError(f"{directory}: {name} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ModelFormatError(f"{path}: size {size} bytes, manifest says {info['bytes']} (truncated or replaced)")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise ModelFormatError(f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest {info['sha256'][:12]}...)")


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    args = {k: v for k, v in data.items() if k in known}
    args["rope_scaling"] = RopeScaling(**data.get("rope_scaling", {}))
    return ModelConfig(**args)


def tokenizer_to_dict(spec: TokenizerSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(TokenizerSpec)}


def tokenizer_from_dict(data: dict[str, Any]) -> TokenizerSpec:
    known = {f.name for f in fields(TokenizerSpec)}
    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    return TokenizerSpec(**args)


def load_artifact(directory: Path, verify: bool = True) -> ModelDescription:
    """The description of an exported directory (config + tokenizer; weights live in the backend's files)."""
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    try:
        config = config_from_dict(manifest["config"])
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{directory / MANIFEST}: bad config ({exc})") from None
    tokenizer = None
    spec_path = directory / TOKENIZER_SPEC
    if spec_path.is_file():
        try:
            data = json.loads(spec_path.read_bytes().decode("utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"expected an object, found {type(data).__name__}")
            tokenizer = tokenizer_from_dict(data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{spec_path}: corrupt tokenizer ({exc})") from None
        if len(tokenizer.token_types) != len(tokenizer.tokens):
            raise ModelFormatError(f"{spec_path}: {len(tokenizer.tokens)} tokens but "
                                   f"{len(tokenizer.token_types)} token types")
        if len(tokenizer.tokens) != config.vocab_size:
            raise ModelFormatError(
                f"{spec_path}: tokenizer has {len(tokenizer.tokens)} tokens but the model's vocabulary is "
                f"{config.vocab_size} (tokenizer and model do not belong together)"
            )
    return ModelDescription(config=config, weights=ModelWeights({}, source=str(directory)), tokenizer=tokenizer,
                            source=directory, file_type=manifest.get("file_type", ""),
                            metadata={"artifact": manifest, "backend": manifest["backend"], "verified": verify})
