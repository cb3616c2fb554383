"""Backends behind one small interface: open a session over a layer range, feed tokens or hidden states."""

from edgellm.runtime.backend import Backend, LayerRange, Session
from edgellm.runtime.registry import backend_names, create_backend

__all__ = ["Backend", "LayerRange", "Session", "backend_names", "create_backend"]
