"""Moving a session's split on the server: reopen the session for a new layer range, KV carried over.

A backend Session owns the KV of exactly its layers, so a move opens a fresh Session for [new_start, n),
hands it the KV of the layers both ranges share plus the joining layers' KV (uploaded by the device, or
recomputed here from the token history with one [0, old_start) pass: the server holds the whole model).
Everything goes through Session.read_kv/import_kv, so any backend whose sessions implement them can serve.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgellm.errors import ConfigError
from edgellm.runtime.backend import Backend, LayerRange, Session

KV = tuple[np.ndarray, np.ndarray]  # (K, V), each float32 (position, n_kv_heads, head_dim)


def read_kv(session: Session, layer: int) -> KV:
    """One layer's K and V for the cached positions; a backend that cannot export its cache is a 400."""
    try:
        return session.read_kv(layer)
    except NotImplementedError as exc:
        raise ConfigError(f"{exc}: this server's backend cannot move KV between sessions") from None


def recompute_kv(backend: Backend, layers: range, token_ids: list[int], chunk_tokens: int) -> dict[int, KV]:
    """KV of `layers` for the whole token history: a pass over [0, layers.stop) on a scratch session, in chunks
    of chunk_tokens (one chunk, the usual case, reproduces a device's single prefill bit for bit)."""
    n = backend.config.n_layers
    scratch = backend.open_session(LayerRange(0, layers.stop, n), max_tokens=len(token_ids))
    ids = np.asarray(token_ids, dtype=np.int64)
    for i in range(0, len(ids), chunk_tokens):
        scratch.forward(ids[i:i + chunk_tokens])
    return {layer: read_kv(scratch, layer) for layer in layers}


def reopen(backend: Backend, old: Session, new_start: int, max_tokens: int, joining: Mapping[int, KV]) -> Session:
    """A Session for [new_start, n) at old.position: shared layers' KV copied from `old`, `joining` layers
    (which may hold more positions than old.position) cut to it."""
    n, position = backend.config.n_layers, old.position
    new = backend.open_session(LayerRange(new_start, n, n), max_tokens=max_tokens)
    if position:
        kv = {}
        for layer in range(new_start, n):
            keys, values = joining[layer] if layer in joining else read_kv(old, layer)
            kv[layer] = (keys[:position], values[:position])
        try:
            new.import_kv(kv, position)
        except NotImplementedError as exc:
            raise ConfigError(f"{exc}: this server's backend cannot move KV between sessions") from None
    return new
