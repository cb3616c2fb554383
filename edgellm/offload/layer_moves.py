"""Moving a session's split on the server: read/write per-layer KV, reopen the session for a new range.

A backend Session owns the KV of exactly its layers, so a move opens a fresh Session for [new_start, n),
copies the KV of the layers both ranges share, and fills the joining layers from uploaded KV or by
recomputing them from the token history (one [0, old_start) pass; the server holds the whole model).
Needs sessions that expose a `cache` with keys/values (n_layers_in_range, max_tokens, n_kv_heads, head_dim),
as the reference backend's do.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgellm.errors import ConfigError
from edgellm.model.config import ModelConfig
from edgellm.runtime.backend import Backend, LayerRange, Session

KV = tuple[np.ndarray, np.ndarray]  # (K, V), each float32 (position, n_kv_heads, head_dim)


def _cache(session: Session):
    cache = getattr(session, "cache", None)
    if cache is None or not hasattr(cache, "keys"):
        raise ConfigError(f"{type(session).__name__} does not expose its KV cache; KV transfer needs the "
                          "reference backend")
    return cache


def kv_heads(config: ModelConfig, layer: int) -> int:
    """KV heads of one layer (structured pruning may give layers fewer; they use a slot's leading heads)."""
    per_layer = getattr(config, "n_kv_heads_at", None)
    return per_layer(layer) if per_layer is not None else config.n_kv_heads


def read_kv(session: Session, config: ModelConfig, layer: int) -> KV:
    """Copies of one layer's K and V for the cached positions, float32 (position, n_kv_heads, head_dim)."""
    import torch

    cache = _cache(session)
    slot, n, h = layer - cache.start_layer, session.position, kv_heads(config, layer)
    with torch.no_grad():
        return (cache.keys[slot, :n, :h].to(torch.float32).numpy().copy(),
                cache.values[slot, :n, :h].to(torch.float32).numpy().copy())


def write_kv(session: Session, layer: int, kv: KV, n_tokens: int) -> None:
    """Store the first n_tokens positions of (K, V) (n_tokens, heads, head_dim) as `layer`'s cache."""
    import torch

    cache = _cache(session)
    slot = layer - cache.start_layer
    keys, values = (torch.from_numpy(np.ascontiguousarray(a[:n_tokens])) for a in kv)
    h = keys.shape[1]
    with torch.no_grad():
        cache.keys[slot, :n_tokens, :h] = keys.to(cache.keys.dtype)
        cache.values[slot, :n_tokens, :h] = values.to(cache.values.dtype)


def recompute_kv(backend: Backend, layers: range, token_ids: list[int], chunk_tokens: int) -> dict[int, KV]:
    """KV of `layers` for the whole token history: a pass over [0, layers.stop) on a scratch session, in chunks
    of chunk_tokens (one chunk, the usual case, reproduces a device's single prefill bit for bit)."""
    n = backend.config.n_layers
    scratch = backend.open_session(LayerRange(0, layers.stop, n), max_tokens=len(token_ids))
    ids = np.asarray(token_ids, dtype=np.int64)
    for i in range(0, len(ids), chunk_tokens):
        scratch.forward(ids[i:i + chunk_tokens])
    return {layer: read_kv(scratch, backend.config, layer) for layer in layers}


def reopen(backend: Backend, old: Session, new_start: int, max_tokens: int, joining: Mapping[int, KV]) -> Session:
    """A Session for [new_start, n) at old.position: KV of shared layers copied, `joining` layers filled."""
    n = backend.config.n_layers
    position = old.position
    new = backend.open_session(LayerRange(new_start, n, n), max_tokens=max_tokens)
    if position:
        src, dst = _cache(old), _cache(new)
        for layer in range(new_start, n):
            if layer in joining:
                write_kv(new, layer, joining[layer], position)
            else:  # shared layer: tensor to tensor, no numpy round trip
                s, d, h = layer - src.start_layer, layer - dst.start_layer, kv_heads(backend.config, layer)
                dst.keys[d, :position, :h] = src.keys[s, :position, :h]
                dst.values[d, :position, :h] = src.values[s, :position, :h]
        dst.length = position
    new.position = position
    return new
