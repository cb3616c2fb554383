"""Which model a side holds: the sha256 the device and the server compare before splitting a model between them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgellm.model.artifact import sha256_file
from edgellm.model.description import ModelDescription


def model_sha256(description: ModelDescription) -> str:
    """sha256 of the model file; for a directory, of every file's name and sha256 in sorted order."""
    source = Path(description.source)
    if source.is_file():
        return sha256_file(source)
    h = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(source).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def model_id(description: ModelDescription) -> str:
    """A human-readable name: the model's own name, else its file or directory name."""
    return description.config.name or Path(description.source).name
