"""edgellm: run generative LLMs well on small hardware.

Importing this package is cheap: torch, onnxruntime, tvm and pynq are imported only by the backends
and passes that need them.
"""

__version__ = "0.1.0"

from edgellm.errors import EdgeLLMError  # noqa: E402

__all__ = ["EdgeLLMError", "__version__"]
