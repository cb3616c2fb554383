"""Backend names -> the module that defines them, imported only when asked for.

Lazy so that `import edgellm` never pulls torch, onnxruntime, tvm or pynq. A new target adds one
backend file and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgellm.errors import unknown_name
from edgellm.runtime.backend import Backend

BACKEND_MODULES: dict[str, str] = {
    "reference": "edgellm.runtime.reference:ReferenceBackend",
    "llama.cpp": "edgellm.runtime.llamacpp:LlamaCppBackend",
    "onnxruntime": "edgellm.runtime.onnxruntime_cpu:OrtBackend",
}


def backend_names() -> list[str]:
    return list(BACKEND_MODULES)


def backend_class(name: str) -> type[Backend]:
    if name not in BACKEND_MODULES:
        raise unknown_name("backend", name, backend_names())
    module, _, cls = BACKEND_MODULES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def create_backend(name: str, model: Any, **options: Any) -> Backend:
    """Instantiate backend `name` for `model` (a ModelDescription)."""
    return backend_class(name).from_model(model, **options)
