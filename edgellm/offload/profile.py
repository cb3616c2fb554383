"""What a split costs to compute and to ship: per-layer latency profiles, activation sizes, energy.

The device profile is measured on the device backend itself (one session per layer, timed on the same
Session interface generation runs through), never assumed, and cached per (backend, model, machine,
threads, label). The server's profile comes from its capabilities (measured there at start-up). Both
have the same shape, so the planner treats the two sides alike:

    compute_ms(layers [a, b), T tokens, phase) = sum of per-layer ms (x T for prefill) (+ head ms)

Activation sizes follow from the model config alone: what crosses the wire at split K is token ids
(K = 0) or float32 hidden states (0 < K < n) going up, and logits (or one token id) coming back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.compress.target import EnergyModel, load_target
from edgellm.errors import ConfigError
from edgellm.model.config import ModelConfig
from edgellm.runtime.backend import Backend, LayerRange

log = logging.getLogger(__name__)
PROFILE_FORMAT = "edgellm-offload-profile"
TENSOR_HEADER_BYTES = 8 + 4 * 2  # PROTOCOL.md: magic, dtype, ndim, reserved, then 2 dims of u32


@dataclass(frozen=True)
class LayerProfile:
    """Milliseconds per layer on one side: one decode position, and per token of a prefill chunk."""

    layer_ms_decode: tuple[float, ...]
    layer_ms_prefill_per_token: tuple[float, ...]
    head_ms: float  # final norm + lm head for one position
    source: str = ""  # where the numbers come from (measured where, when)

    def __post_init__(self) -> None:
        if len(self.layer_ms_decode) != len(self.layer_ms_prefill_per_token):
            raise ConfigError(f"profile has {len(self.layer_ms_decode)} decode but "
                              f"{len(self.layer_ms_prefill_per_token)} prefill layer timings")
        values = (*self.layer_ms_decode, *self.layer_ms_prefill_per_token, self.head_ms)
        if any(not np.isfinite(v) or v < 0 for v in values):
            raise ConfigError("profile timings must be finite and >= 0 ms")

    @property
    def n_layers(self) -> int:
        return len(self.layer_ms_decode)

    def layers_ms(self, start: int, stop: int, n_tokens: int = 1, prefill: bool = False) -> float:
        """Layers [start, stop) for n_tokens positions (one chunk when prefill, else n decode steps)."""
        per = self.layer_ms_prefill_per_token if prefill else self.layer_ms_decode
        return float(sum(per[start:stop])) * n_tokens

    def layer_median(self) -> LayerProfile:
        """Every layer at the median over layers: for a model whose layers have one shape, where timings
        of single layers from one short run on a shared host scatter by several x."""
        n = self.n_layers
        return LayerProfile((float(np.median(self.layer_ms_decode)),) * n,
                            (float(np.median(self.layer_ms_prefill_per_token)),) * n, self.head_ms,
                            f"{self.source}, median layer")

    def scaled(self, factor: float) -> LayerProfile:
        """Every timing x factor (a live correction from measured server times, or an emulated board)."""
        return LayerProfile(tuple(v * factor for v in self.layer_ms_decode),
                            tuple(v * factor for v in self.layer_ms_prefill_per_token), self.head_ms * factor,
                            f"{self.source} x {factor:.3g}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "profile") -> LayerProfile:
        try:
            return cls(tuple(float(v) for v in data["layer_ms_decode"]),
                       tuple(float(v) for v in data["layer_ms_prefill_per_token"]),
                       float(data["head_ms"]), str(data.get("source", data.get("measured_at", ""))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: not a layer profile ({exc!r}); needs layer_ms_decode, "
                              "layer_ms_prefill_per_token, head_ms") from None

    @classmethod
    def uniform(cls, n_layers: int, decode_ms: float, prefill_ms_per_token: float, head_ms: float) -> LayerProfile:
        """Every layer alike (tests, what-if planning)."""
        return cls((decode_ms,) * n_layers, (prefill_ms_per_token,) * n_layers, head_ms, "uniform")


@dataclass(frozen=True)
class ActivationSizes:
    """Bytes crossing the wire, from the model config (float32 hidden states: exact offload)."""

    hidden_size: int
    vocab_size: int
    kv_values_per_token_per_layer: int  # n_kv_heads * head_dim, for K and V each
    hidden_itemsize: int = 4
    token_id_bytes: int = 4

    @classmethod
    def from_config(cls, config: ModelConfig, hidden_itemsize: int = 4) -> ActivationSizes:
        return cls(config.hidden_size, config.vocab_size, config.kv_size, hidden_itemsize)

    @property
    def hidden_bytes_per_token(self) -> int:
        return self.hidden_size * self.hidden_itemsize

    def uplink_bytes(self, split: int, n_tokens: int) -> int:
        """Request body at split K: token ids when K = 0, else hidden states (T, hidden)."""
        per = self.token_id_bytes if split == 0 else self.hidden_bytes_per_token
        return TENSOR_HEADER_BYTES + per * n_tokens

    def downlink_bytes(self, token_only: bool) -> int:
        """Response body: float32 logits of the last position, or one int32 token (greedy)."""
        return TENSOR_HEADER_BYTES + (4 if token_only else 4 * self.vocab_size)

    def kv_bytes(self, n_layers: int, n_tokens: int) -> int:
        """float32 K and V of n_layers layers for n_tokens positions (a KV move)."""
        return 2 * 4 * self.kv_values_per_token_per_layer * n_layers * n_tokens + TENSOR_HEADER_BYTES * 2 * n_layers


def energy_model(target: str | Path) -> EnergyModel:
    """Device power while computing / transmitting / idle, from a target's `[energy]` table."""
    return load_target(target).energy


def measure_layer_profile(backend: Backend, prefill_tokens: int = 32, decode_context: int = 32,
                          repeats: int = 5, seed: int = 0, statistic: str = "median") -> LayerProfile:
    """Time every layer of `backend` through its own Session interface (one session per layer).

    Decode: one position after `decode_context` cached ones, the median (or "min": the host's best, for
    a noise-free base) of `repeats`. Prefill: one chunk of `prefill_tokens`, the best of
    max(2, repeats // 2), per token. The head is the last layer's session (which ends in the head) minus
    that layer's cost, taken as the median of the others.
    """
    if statistic not in ("median", "min"):
        raise ConfigError(f"statistic must be median or min, found {statistic!r}")
    pick = statistics.median if statistic == "median" else min
    cfg = backend.config
    n = cfg.n_layers
    if not backend.supports_layer_ranges:
        raise ConfigError(f"backend {backend.name!r} cannot run single layers; profile it with a backend "
                          "that supports layer ranges (e.g. reference)")
    rng = np.random.default_rng(seed)
    hidden = (rng.standard_normal((prefill_tokens + decode_context + 1, cfg.hidden_size)) * 0.5).astype(np.float32)
    ids = rng.integers(0, cfg.vocab_size, size=prefill_tokens + decode_context + 1)
    decode, prefill = [], []
    last_total = 0.0
    for i in range(n):
        session = backend.open_session(LayerRange(i, i + 1, n), max_tokens=prefill_tokens + decode_context + 1)
        x = ids if i == 0 else hidden
        chunk = []
        for _ in range(max(2, repeats // 2)):
            session.truncate(0)
            chunk.append(_timed(session.forward, x[:prefill_tokens]))
        session.truncate(0)
        session.forward(x[:decode_context])
        steps = []
        for _ in range(repeats + 1):  # the first is a warm-up
            steps.append(_timed(session.forward, x[decode_context:decode_context + 1]))
            session.truncate(decode_context)
        prefill.append(min(chunk) / prefill_tokens)
        decode.append(pick(steps[1:]))
        if i == n - 1:
            last_total = decode[-1]
    if n > 1:  # the last session includes the head; take that layer's cost as the others' median
        decode[-1] = statistics.median(decode[:-1])
        prefill[-1] = statistics.median(prefill[:-1])
    head = max(0.0, last_total - decode[-1])
    source = f"measured on {backend.name} at {time.strftime('%Y-%m-%dT%H:%M:%S')} on {platform.node()}"
    return LayerProfile(tuple(decode), tuple(prefill), head, source)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def profile_cache_dir() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm") / "offload-profile"


def profile_key(backend: Backend, model_key: str, label: str = "") -> str:
    """Cache key: what the timings depend on (backend, model, machine, threads, a caller's label)."""
    import torch  # the only device backends that run layer ranges today are torch based

    parts = [backend.name, model_key, platform.machine(), platform.processor(), str(os.cpu_count()),
             str(torch.get_num_threads()), label]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_or_measure(backend: Backend, model_key: str, label: str = "", cache_dir: Path | None = None,
                    refresh: bool = False, **measure_options: Any) -> LayerProfile:
    """The cached device profile for this backend/model/machine, measured (and cached) when missing."""
    path = (cache_dir or profile_cache_dir()) / f"{profile_key(backend, model_key, label)}.json"
    if path.is_file() and not refresh:
        try:
            return LayerProfile.from_dict(json.loads(path.read_text()), str(path))
        except (ConfigError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable profile cache %s: %s", path, exc)
    profile = measure_layer_profile(backend, **measure_options)
    if profile.n_layers != backend.config.n_layers:
        raise ConfigError(f"measured {profile.n_layers} layers, the model has {backend.config.n_layers}")
    _write_json_atomic(path, profile.to_dict())
    return profile


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def server_profile(capabilities: Mapping[str, Any]) -> LayerProfile:
    """The server's per-layer profile from its `/v1/capabilities` answer."""
    if "profile" not in capabilities:
        raise ConfigError("server capabilities carry no 'profile'; a v1 server measures one at start-up")
    profile = LayerProfile.from_dict(capabilities["profile"], "server capabilities profile")
    n = capabilities.get("n_layers")
    if n is not None and profile.n_layers != int(n):
        raise ConfigError(f"server profile has {profile.n_layers} layers, its model {n}")
    return profile

