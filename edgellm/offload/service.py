"""What the cloud service does, without HTTP: sessions over [start, n_layers) + head, forward, split moves, KV.

Every method is synchronous (it runs in a worker thread), takes the session's lock so that concurrent
requests to one session serialize, and raises ApiError for anything the caller got wrong. server.py only
maps HTTP onto these methods.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

import numpy as np

from edgellm.offload import layer_moves, wire
from edgellm.offload.session_store import ApiError, ServerSession, SessionStore, kv_bytes
from edgellm.runtime.backend import Backend, LayerRange


@dataclass(frozen=True)
class ForwardResult:
    payload: bytes
    compute_ms: float


class OffloadService:
    """The backend, its model's identity, and the session store."""

    def __init__(self, backend: Backend, model_sha256: str, store: SessionStore, kv_itemsize: int = 4,
                 max_forward_tokens: int = 2048, max_response_bytes: int = 64 << 20) -> None:
        self.backend = backend
        # Bounds on one step's transient memory, which the KV reservation does not cover: attention scores
        # grow with T x position, and all-position logits with T x vocab.
        self.max_forward_tokens = max_forward_tokens
        self.max_response_bytes = max_response_bytes
        self.config = backend.config
        self.n_layers = backend.config.n_layers
        self.model_sha256 = model_sha256.lower()
        self.store = store
        self.kv_itemsize = kv_itemsize

    # -- helpers ------------------------------------------------------------------------------------------------
    def kv_bytes(self, n_layers: int, n_tokens: int) -> int:
        return kv_bytes(n_layers, n_tokens, self.config.n_kv_heads, self.config.head_dim, self.kv_itemsize)

    def info(self, entry: ServerSession) -> dict:
        s = entry.session
        return {"session_id": entry.id, "start": s.layers.start, "stop": s.layers.stop, "position": s.position,
                "max_tokens": entry.max_tokens, "idle_expiry_s": self.store.idle_expiry_s}

    def _locked(self, session_id: str) -> ServerSession:
        """The session, its lock acquired (release it!), 404/410 if it is gone."""
        entry = self.store.get(session_id)
        entry.lock.acquire()
        try:
            self.store.check_open(entry)
        except ApiError:
            entry.lock.release()
            raise
        return entry

    def _done(self, entry: ServerSession) -> None:
        entry.last_used = self.store.clock()
        entry.lock.release()

    @staticmethod
    def _stale(entry: ServerSession, position: int) -> ApiError:
        held = entry.session.position
        return ApiError(409, "stale_position", f"request is for position {position} but the session holds {held} "
                        "tokens (a retried or stale request)", position=held)

    # -- endpoints ----------------------------------------------------------------------------------------------
    def create(self, model_sha256: str, start: int, max_tokens: int) -> dict:
        if not hmac.compare_digest(model_sha256.lower().encode(), self.model_sha256.encode()):
            raise ApiError(409, "model_mismatch", f"the device's model sha256 {model_sha256[:16]!r}... differs from "
                           f"the server's {self.model_sha256[:16]}...; both sides must hold the same model file")
        if not 0 <= start < self.n_layers:
            raise ApiError(400, "bad_range", f"start {start} outside [0, {self.n_layers}) (all-local needs no session)")
        if max_tokens > self.config.context_length:
            raise ApiError(400, "context_overflow", f"max_tokens {max_tokens} exceeds the model's context of "
                           f"{self.config.context_length}")
        layers = LayerRange(start, self.n_layers, self.n_layers)
        entry = self.store.add(lambda: self.backend.open_session(layers, max_tokens),
                               self.kv_bytes(len(layers), max_tokens), max_tokens)
        return self.info(entry)

    def forward(self, session_id: str, position: int, body: bytes, output: str, all_logits: bool) -> ForwardResult:
        if output == "hidden":
            raise ApiError(400, "unsupported_output", "output=hidden is reserved: v1 servers always run to the head")
        entry = self._locked(session_id)
        try:
            s = entry.session
            if position != s.position:
                raise self._stale(entry, position)
            if s.layers.takes_tokens:
                x = wire.decode_tensor(body, allowed=wire.INT_DTYPES, ndim=1, what="token ids")
            else:
                x = wire.decode_tensor(body, allowed=wire.FLOAT_DTYPES, ndim=2, finite=True, what="hidden states")
                if x.shape[1] != self.config.hidden_size:
                    raise ApiError(400, "bad_shape", f"hidden states have width {x.shape[1]}, the model's is "
                                   f"{self.config.hidden_size}")
                x = x.astype(np.float32, copy=False)
            self._check_step_size(len(x), all_logits)
            t0 = time.perf_counter()
            logits = s.forward(x, all_logits=all_logits)  # (1 or T, vocab)
            compute_ms = (time.perf_counter() - t0) * 1e3
        finally:
            self._done(entry)
        if output == "token":
            return ForwardResult(wire.encode_tensor(np.array([int(np.argmax(logits[-1]))], dtype=np.int32)),
                                 compute_ms)
        return ForwardResult(wire.encode_tensor(np.asarray(logits, dtype=np.float32)), compute_ms)

    def _check_step_size(self, n_tokens: int, all_logits: bool) -> None:
        if n_tokens > self.max_forward_tokens:
            raise ApiError(400, "too_many_tokens", f"{n_tokens} positions in one step; this server takes at most "
                           f"{self.max_forward_tokens} (send the prefill in chunks)")
        if all_logits and n_tokens * self.config.vocab_size * 4 > self.max_response_bytes:
            raise ApiError(400, "response_too_large", f"all=true for {n_tokens} positions is "
                           f"{n_tokens * self.config.vocab_size * 4} bytes of logits, over the server's "
                           f"{self.max_response_bytes}; ask for fewer positions or only the last one")

    def move(self, session_id: str, start: int, position: int, token_ids: list[int] | None) -> dict:
        entry = self._locked(session_id)
        try:
            self._move(entry, start, position, token_ids)
            return self.info(entry)
        finally:
            self._done(entry)

    def _move(self, entry: ServerSession, start: int, position: int, token_ids: list[int] | None) -> None:
        s, n = entry.session, self.n_layers
        if not 0 <= start < n:
            raise ApiError(400, "bad_range", f"start {start} outside [0, {n}) (to go all-local, delete the session)")
        if position > s.position:
            raise self._stale(entry, position)
        if token_ids is not None:
            if len(token_ids) != position:
                raise ApiError(400, "bad_token_ids", f"token_ids holds {len(token_ids)} ids, position is {position}")
            if any(not 0 <= t < self.config.vocab_size for t in token_ids):
                raise ApiError(400, "bad_token_ids", f"token_ids must lie in [0, {self.config.vocab_size})")
        joining = self._joining_kv(entry, range(start, s.layers.start), position, token_ids)
        new_bytes = self.kv_bytes(n - start, entry.max_tokens)
        delta = new_bytes - entry.reserved_bytes
        if start != s.layers.start and delta > 0:
            self.store.reserve(delta, new_bytes)
        try:
            if position < s.position:
                s.truncate(position)
            if start != s.layers.start:
                entry.session = layer_moves.reopen(self.backend, s, start, entry.max_tokens, joining)
        except BaseException:
            if start != s.layers.start and delta > 0:
                self.store.release(delta)
            raise
        if start != s.layers.start:
            if delta < 0:
                self.store.release(-delta)
            entry.reserved_bytes = new_bytes
        self.store.release(entry.staged_bytes)
        entry.staged.clear()
        entry.staged_bytes = 0

    def _joining_kv(self, entry: ServerSession, layers: range, position: int,
                    token_ids: list[int] | None) -> dict[int, layer_moves.KV]:
        """KV for layers joining the server: uploaded where it covers `position`, else recomputed."""
        if not layers or position == 0:
            return {}
        kv = {i: entry.staged[i] for i in layers if i in entry.staged and entry.staged[i][0].shape[0] >= position}
        missing = [i for i in layers if i not in kv]
        if not missing:
            return kv
        if token_ids is None:
            raise ApiError(409, "kv_missing", f"layers {missing[0]}..{missing[-1]} join the server at position "
                           f"{position} but their KV was neither uploaded (PUT .../kv) nor token_ids given")
        scratch = self.kv_bytes(missing[-1] + 1, position)
        self.store.reserve(scratch)
        try:
            kv.update(layer_moves.recompute_kv(self.backend, range(missing[0], missing[-1] + 1), token_ids,
                                                    self.max_forward_tokens))
        finally:
            self.store.release(scratch)
        return kv

    def put_kv(self, session_id: str, start: int, stop: int, body: bytes) -> None:
        entry = self._locked(session_id)
        try:
            if not 0 <= start < stop <= entry.start:
                raise ApiError(400, "bad_range", f"KV upload is for layers about to join the server: need "
                               f"0 <= start < stop <= {entry.start}, found [{start}, {stop})")
            tensors = wire.decode_tensors(body, count=2 * (stop - start), allowed=("float32",), ndim=3, finite=True)
            layers = range(start, stop)
            self._check_kv_shapes(tensors, start, entry.max_tokens)
            freed = sum(entry.staged[i][0].nbytes * 2 for i in layers if i in entry.staged)
            added = sum(t.nbytes for t in tensors)
            self.store.reserve(added - freed, entry.reserved_bytes + entry.staged_bytes - freed + added)
            for j, i in enumerate(layers):
                entry.staged[i] = (tensors[2 * j], tensors[2 * j + 1])
            entry.staged_bytes += added - freed
        finally:
            self._done(entry)

    def _check_kv_shapes(self, tensors: list[np.ndarray], start: int, max_tokens: int) -> None:
        """(position, heads, head_dim), one position for all, K and V alike; the exact head count of a layer
        (fewer in a structurally pruned one) is checked by the session that adopts the KV."""
        cfg, position = self.config, tensors[0].shape[0]
        for j, t in enumerate(tensors):
            partner = tensors[j ^ 1]  # K <-> V of the same layer
            if (t.shape[0] != position or position > max_tokens or t.shape[2] != cfg.head_dim
                    or t.shape[1] > cfg.n_kv_heads or t.shape != partner.shape):
                raise ApiError(400, "bad_shape", f"layer {start + j // 2} {'KV'[j % 2]} is {t.shape}; every K "
                               f"and V must be (position <= {max_tokens}, n_kv_heads <= {cfg.n_kv_heads}, "
                               f"{cfg.head_dim}) with one position, found position {position} first")

    def get_kv(self, session_id: str, start: int, stop: int) -> bytes:
        entry = self._locked(session_id)
        try:
            if not entry.start <= start < stop <= self.n_layers:
                raise ApiError(400, "bad_range", f"the session holds layers [{entry.start}, {self.n_layers}); "
                               f"cannot send [{start}, {stop})")
            if entry.session.position == 0:
                raise ApiError(409, "empty_cache", "the session holds no positions yet; nothing to download",
                               position=0)
            tensors = [t for i in range(start, stop) for t in layer_moves.read_kv(entry.session, i)]
            return wire.encode_tensors(tensors, "float32")
        finally:
            self._done(entry)

    def delete(self, session_id: str) -> None:
        entry = self._locked(session_id)
        try:
            self.store.remove(entry, "deleted")
        finally:
            entry.lock.release()
