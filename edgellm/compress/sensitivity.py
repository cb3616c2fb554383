"""Per-unit quality cost of each format, measured: KL(original || quantized) on calibration text when
only that unit is quantized. The allocator adds these up (the usual independence assumption).

Layers before the unit are unchanged, so their output is cached once and each measurement runs only
the layers from the unit on. Results are cached as JSON keyed by model, formats and calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgellm.compress.units import Unit, units
from edgellm.errors import ConfigError
from edgellm.model.description import ModelDescription

GRID_VERSION = "fp16-scales"  # block_formats.rtn_grid: a change in the quantizers' numerics invalidates tables


@dataclass(frozen=True)
class SensitivityConfig:
    calibration: str = "asyoulik.txt"  # a Canterbury file; evaluation uses alice29.txt
    tokens: int = 512
    window: int = 256
    formats: tuple[str, ...] = ("int8", "int4", "int4-sym", "int2")
    grid: str = GRID_VERSION  # recorded in every table, so tables of other quantizer numerics are never mixed

    def __post_init__(self) -> None:
        if self.tokens < self.window or self.window < 2:
            raise ConfigError(f"need tokens >= window >= 2, found tokens={self.tokens} window={self.window}")


@dataclass
class SensitivityTable:
    """unit name -> format -> mean KL per token (nats)."""

    model: str
    config: dict
    kl: dict[str, dict[str, float]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SensitivityTable:
        return cls(**json.loads(path.read_text()))


def cache_key(description: ModelDescription, config: SensitivityConfig) -> str:
    h = hashlib.sha256(f"{description.source}:{description.source.stat().st_size}".encode())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    return h.hexdigest()[:16]


def calibration_ids(tokenizer, config: SensitivityConfig) -> list[int]:
    from edgellm.corpus import canterbury_path

    ids = tokenizer.encode(canterbury_path(config.calibration).read_bytes().decode("utf-8"))
    if len(ids) < config.tokens:
        raise ConfigError(f"{config.calibration} has {len(ids)} tokens, fewer than the {config.tokens} asked for")
    return ids[: config.tokens]


def _windows(ids, window: int) -> list:
    """Back-to-back calibration windows (a partial last window is dropped)."""
    return [ids[s:s + window] for s in range(0, len(ids) - window + 1, window)]


def _kl(base_logp, logq) -> float:
    """Mean per-token KL(base || quantized) from log-probabilities."""
    return float((base_logp.exp() * (base_logp - logq)).sum(-1).mean())


def measure_sensitivity(description: ModelDescription, token_ids: Sequence[int], config: SensitivityConfig,
                        progress: bool = False, only: Sequence[Unit] | None = None) -> SensitivityTable:
    import torch

    from edgellm.compress.rtn import dequantized_weight  # every plan format, 3-bit and groups of 64/128 too
    from edgellm.model.llama import KVCache, LlamaModel

    model = LlamaModel(description)
    cfg = model.config
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    windows = _windows(ids, config.window)

    def run_from(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        cache = KVCache.allocate(cfg, layer, cfg.n_layers, hidden.shape[0])
        out = model.run_layers(hidden, cache, layer, cfg.n_layers)
        return torch.log_softmax(model.head(out), dim=-1)

    inputs: list[list[torch.Tensor]] = []  # per window, the hidden state entering each layer
    base: list[torch.Tensor] = []
    with torch.no_grad():
        for w in windows:
            h = model.embed(w)
            per_layer = []
            for i in range(cfg.n_layers):
                per_layer.append(h)
                h = model.run_layers(h, KVCache.allocate(cfg, i, i + 1, len(w)), i, i + 1)
            inputs.append(per_layer)
            base.append(torch.log_softmax(model.head(h), dim=-1))
    todo = list(only) if only is not None else units(cfg)
    table = SensitivityTable(model=str(description.source), config=asdict(config))
    jobs = [(u, f) for u in todo for f in config.formats]
    iterator = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="sensitivity", unit="unit x format")
    for unit, fmt in iterator:
        saved = {}
        for member in unit.members:
            role = member.split(".", 2)[2]
            values = dequantized_weight(description.weights[f"{member}.weight"], fmt)
            saved[role] = model.layers[unit.layer][role]
            model.layers[unit.layer][role] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        kl = 0.0
        with torch.no_grad():
            for w_inputs, w_base in zip(inputs, base, strict=True):
                logq = run_from(unit.layer, w_inputs[unit.layer])
                kl += _kl(w_base, logq)
        model.layers[unit.layer].update(saved)
        table.kl.setdefault(unit.name, {})[fmt] = kl / len(windows)
    return table



HEAD_UNIT = "lm_head"  # the table's row for the lm_head (with tied embeddings: embedding + lm_head)


def measure_head_sensitivity(description: ModelDescription, token_ids: Sequence[int], config: SensitivityConfig,
                             formats: Sequence[str]) -> dict[str, float]:
    """format -> mean KL per token when only the lm_head tensor (tied: the embedding too) is quantized."""
    import torch

    from edgellm.compress.rtn import dequantized_weight
    from edgellm.model.llama import KVCache, LlamaModel
    from edgellm.model.weights import ModelWeights, WeightTensor

    name = description.lm_head_name()
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    windows = _windows(ids, config.window)

    def log_probs(desc: ModelDescription) -> list:
        model = LlamaModel(desc)
        n = model.config.n_layers
        with torch.no_grad():
            return [torch.log_softmax(model.head(model.run_layers(model.embed(w), KVCache.allocate(
                model.config, 0, n, len(w)), 0, n)), dim=-1) for w in windows]

    base = log_probs(description)
    out = {}
    for fmt in formats:
        tensors = dict(description.weights.items())
        tensors[name] = WeightTensor.from_array(name, dequantized_weight(description.weights[name], fmt))
        changed = ModelDescription(config=description.config, weights=ModelWeights(tensors), tokenizer=description.tokenizer,
                                   source=description.source, file_type=description.file_type,
                                   metadata=dict(description.metadata))
        got = log_probs(changed)
        out[fmt] = sum(_kl(b, q) for b, q in zip(base, got, strict=True)) / len(windows)
    return out
