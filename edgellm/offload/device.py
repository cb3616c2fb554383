"""The device's half of a split: one Session over layers [0, K) of the device backend, re-cut when K moves.

A re-cut opens a fresh Session for [0, K') at the same position, copies the KV of the layers both ranges
share, and fills the layers that join the device from downloaded KV or by recomputing them. Recompute
*replays* the token history in its original forward() chunks (the prompt as one chunk, then one token at
a time): a batched recompute differs from incremental decoding in the last bits (measured: 1.5e-5 on
SmolLM2's keys), a replay does not, which is what keeps greedy output bit-identical to all-local.

    chunks:   [prompt ......][t1][t2][t3]          ReplayLog: token ids per chunk, and (while K did not
    device:   layers [0, K) ──hidden at K──► wire   move) the hidden states that left at layer K, so a
    server:   layers [K, n) + head                  lost server's layers replay from K, not from 0
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgellm.errors import ConfigError
from edgellm.offload.planner import History
from edgellm.runtime.backend import Backend, LayerRange, Session

log = logging.getLogger(__name__)
KV = tuple[np.ndarray, np.ndarray]  # (K, V), float32 (position, n_kv_heads, head_dim)


@dataclass
class ReplayLog:
    """How every cached position was computed, so any layer range can be rebuilt exactly."""

    chunks: list[np.ndarray] = field(default_factory=list)  # token ids (T,) per forward() call
    boundary: int | None = None  # layer whose inputs `hidden` holds for every position, if any
    hidden: list[np.ndarray] = field(default_factory=list)  # (T, hidden) per chunk, at `boundary`

    @property
    def positions(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def token_ids(self) -> list[int]:
        return [int(t) for c in self.chunks for t in c]

    def history(self) -> History:
        multi = [len(c) for c in self.chunks if len(c) > 1]
        return History(sum(multi), sum(1 for c in self.chunks if len(c) == 1), len(multi))

    def append(self, ids: np.ndarray, split: int, hidden: np.ndarray | None) -> None:
        """Record one chunk run at `split`; `hidden` is what left the device (None: all-local/all-cloud)."""
        if self.boundary is None and not self.chunks and hidden is not None:
            self.boundary = split
        if hidden is None or split != self.boundary:
            self.boundary, self.hidden = None, []  # the log no longer covers every position at one layer
        else:
            self.hidden.append(np.array(hidden, dtype=np.float32, copy=True))
        self.chunks.append(np.asarray(ids, dtype=np.int64).copy())

    def hidden_at(self, layer: int) -> list[np.ndarray] | None:
        if self.boundary == layer and len(self.hidden) == len(self.chunks):
            return self.hidden
        return None


class DeviceStack:
    """Layers [0, split) of the device backend for one sequence (split 0: nothing runs on the device)."""

    def __init__(self, backend: Backend, max_tokens: int) -> None:
        if not backend.supports_layer_ranges:
            raise ConfigError(f"device backend {backend.name!r} runs only the whole model; offloading needs a "
                              "backend that runs layer ranges (e.g. reference)")
        self.backend, self.max_tokens = backend, max_tokens
        self.n_layers = backend.config.n_layers
        self.split = 0
        self.session: Session | None = None
        self.position = 0

    def reset(self, split: int) -> None:
        """A new sequence with layers [0, split) here."""
        self.split, self.position = split, 0
        self.session = self._open(split)

    def _open(self, split: int) -> Session | None:
        if split == 0:
            return None
        return self.backend.open_session(LayerRange(0, split, self.n_layers), max_tokens=self.max_tokens)

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Token ids (T,) -> hidden states at `split` (T, hidden), logits when split = n, ids when split = 0."""
        out = ids if self.session is None else self.session.forward(ids, all_logits=all_logits)
        self.position += len(ids)
        return out

    def truncate(self, n_tokens: int) -> None:
        if self.session is not None:
            self.session.truncate(n_tokens)
        self.position = n_tokens

    def export_kv(self, start: int, stop: int) -> dict[int, KV]:
        """KV of device layers [start, stop) (to upload when they join the server)."""
        if not 0 <= start <= stop <= self.split or self.session is None:
            raise ConfigError(f"the device holds layers [0, {self.split}); cannot export [{start}, {stop})")
        return self.session.export_kv(start, stop)

    def recut(self, split: int, joining: Mapping[int, KV] | None = None, log: ReplayLog | None = None) -> None:
        """Move to [0, split) at the current position: shared layers keep their KV, layers [old, split)
        take `joining` or are replayed from `log`. A backend whose sessions cannot export/import KV
        replays everything."""
        old, p = self.split, self.position
        new = self._open(split)
        if new is not None and p:
            try:
                kv = dict(joining or {})
                if min(old, split) > 0:
                    kv.update(self.session.export_kv(0, min(old, split)))
                missing = [i for i in range(split) if i not in kv]
                if missing:
                    if log is None:
                        raise ConfigError(f"layers {missing} join the device without KV or a replay log")
                    kv.update(replay_kv(self.backend, log, missing[0], split))
                new.import_kv(kv, p)
            except NotImplementedError:
                if log is None:
                    raise ConfigError("this device backend cannot move KV: a re-cut needs the replay log") from None
                new = self._open(split)
                _replay(new, log, 0, split)
        self.session, self.split = new, split


def _replay(session: Session, log: ReplayLog, start: int, stop: int) -> None:
    """Feed the log through `session` (over [start, stop)) in the original chunks."""
    hidden = log.hidden_at(start) if start else None
    for i, ids in enumerate(log.chunks):
        session.forward(hidden[i] if hidden is not None else ids)


def replay_kv(backend: Backend, log: ReplayLog, start: int, stop: int) -> dict[int, KV]:
    """Exact KV of layers [start, stop) for every logged position, recomputed on `backend`.

    Starts from the hidden states logged at `start` when the log has them, else from the token ids at
    layer 0 (the earlier layers are recomputed and thrown away)."""
    n = backend.config.n_layers
    first = start if log.hidden_at(start) is not None and start > 0 else 0
    scratch = backend.open_session(LayerRange(first, stop, n), max_tokens=max(1, log.positions))
    _replay(scratch, log, first, stop)
    return scratch.export_kv(start, stop)
