"""One error hierarchy for edgellm.

Every message says what failed, where (file, field, tensor), what was expected and what was found,
so that the CLI can print it as one line and a user knows what to fix.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every error edgellm raises on purpose."""


class ModelFormatError(EdgeLLMError, ValueError):
    """A model file is corrupt, truncated, or not what its header claims."""


class UnsupportedArchitectureError(ModelFormatError):
    """The model's architecture is not one edgellm implements."""


class UnsupportedTensorTypeError(ModelFormatError):
    """A tensor is stored in a type edgellm cannot dequantize."""


class MissingTensorError(ModelFormatError):
    """A tensor the architecture needs is absent from the file."""


class TensorShapeError(ModelFormatError):
    """A tensor's shape disagrees with the model's configuration."""


class ConfigError(EdgeLLMError, ValueError):
    """A configuration value (generation, model card, recipe) is invalid."""


class UnknownNameError(EdgeLLMError, LookupError):
    """A name (backend, model, target) is not registered; the message lists the valid ones."""


class BackendUnavailableError(EdgeLLMError, ImportError):
    """A backend's optional dependency is missing; the message names the pip extra."""


class ContextOverflowError(EdgeLLMError, ValueError):
    """More tokens were requested than the model's or session's context holds."""


class BenchmarkError(EdgeLLMError, RuntimeError):
    """A benchmark run could not produce a measurement (a worker failed)."""


class DataUnavailableError(EdgeLLMError, FileNotFoundError):
    """An evaluation or calibration file could not be found or fetched."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> UnknownNameError:
    """Build the error for an unregistered name, listing what would have worked."""
    options = ", ".join(sorted(valid)) or "(none registered)"
    plural = kind + ("es" if kind.endswith("s") else "s")
    return UnknownNameError(f"unknown {kind} {name!r}; valid {plural}: {options}")


def missing_extra(package: str, extra: str) -> BackendUnavailableError:
    """Build the error for an optional dependency that is not installed."""
    return BackendUnavailableError(
        f"{package} is not installed; install it with: pip install 'edgellm[{extra}]'"
    )


class CloudError(EdgeLLMError, RuntimeError):
    """The offload service could not do what was asked; the device can fall back to local."""


class CloudUnavailableError(CloudError):
    """Connection refused, timed out, or the server answered 503 (draining/preempted)."""


class CloudSessionLostError(CloudError):
    """The server no longer has the session (404/410): its KV cache must be rebuilt elsewhere."""


class CloudRejectedError(CloudError):
    """The server refused the request (4xx other than 404/410): a bug or a misconfiguration, not a fault."""
