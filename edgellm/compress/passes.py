"""The built-in compression passes. Each is small: read the state, change the plan or weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from edgellm.compress.plan import FORMATS, CompressionPlan
from edgellm.compress.recipe import register_pass
from edgellm.errors import ConfigError
from edgellm.model.description import ModelDescription

log = logging.getLogger(__name__)


@dataclass
class CompressState:
    """What passes read and write: the model, the plan so far, the budget and target, and a report."""

    model: ModelDescription
    plan: CompressionPlan
    seed: int = 0
    budget_bytes: int | None = None
    budget_us: float | None = None
    cost_us: Any = None  # (Unit, format) -> microseconds, from the target's measured table
    target: Any = None  # the Target the plan is for (its supported formats filter the choices)
    progress: bool = False
    cache_dir: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    rewritten: set[str] = field(default_factory=set)  # tensors a pass replaced with float values (saved)


@dataclass(frozen=True)
class QuantizeParams:
    """Uniform round-to-nearest: every linear (and optionally the lm_head) in one format."""

    format: str = "int4"
    lm_head: str = "auto"
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        for value in (self.format, self.lm_head):
            if value not in FORMATS:
                raise ValueError(f"format {value!r} unknown; valid: {', '.join(FORMATS)}")


@register_pass("quantize", QuantizeParams)
def quantize(state: CompressState, p: QuantizeParams) -> None:
    state.plan = CompressionPlan(default=p.format, lm_head=p.lm_head, accuracy_level=p.accuracy_level,
                                 lm_head_accuracy_level=state.plan.lm_head_accuracy_level, name=f"rtn-{p.format}")
    state.report["quantize"] = {"format": p.format, "lm_head": p.lm_head}


@dataclass(frozen=True)
class AllocateParams:
    """Per-unit formats chosen against measured sensitivity and the target's measured costs."""

    formats: tuple[str, ...] = ("auto", "int8", "int4-sym", "int2")
    calibration: str = "asyoulik.txt"
    tokens: int = 512
    window: int = 256
    solver: str = "milp"  # "milp" (exact), "dp" (exact, size budgets), "rl" (HAQ's DDPG search)
    episodes: int = 300  # rl only
    # the lm_head tensor (tied: the embedding too): "auto" keeps the source's; each other format is tried
    # with the bytes it frees given to the linears, and the lowest predicted loss wins (size budgets)
    head_formats: tuple[str, ...] = ("auto",)

    def __post_init__(self) -> None:
        from edgellm.compress.plan import QUANT_FORMATS
        from edgellm.compress.solvers import SOLVERS

        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats {bad or '(empty)'} invalid; valid: {', '.join(FORMATS)}")
        # the ONNX graph gathers tied embeddings from 4- or 8-bit blocks only
        valid = ["auto", *(f for f, q in QUANT_FORMATS.items() if q.bits in (4, 8))]
        bad = [f for f in self.head_formats if f not in valid]
        if bad or not self.head_formats:
            raise ValueError(f"head_formats {bad or '(empty)'} invalid; valid: {', '.join(valid)}")
        if self.solver not in SOLVERS or self.episodes < 2:
            raise ValueError(f"solver {self.solver!r} (valid: {', '.join(SOLVERS)}), episodes {self.episodes} (>= 2)")


@register_pass("allocate", AllocateParams)
def allocate_pass(state: CompressState, p: AllocateParams) -> None:
    from edgellm.compress.allocator import Budget
    from edgellm.compress.sensitivity import (
        HEAD_UNIT,
        SensitivityConfig,
        SensitivityTable,
        cache_key,
        calibration_ids,
        measure_sensitivity,
    )
    from edgellm.compress.units import units
    from edgellm.model.tokenizer import Tokenizer

    if state.budget_bytes is None and state.budget_us is None:
        raise ConfigError("the allocate pass needs a budget: --budget-mb or --budget-ms-per-token")
    if p.head_formats != ("auto",) and state.budget_us is not None:
        raise ConfigError("head_formats other than auto are chosen under a size budget only (--budget-mb); "
                          "the cost table times the lm_head in one format")
    formats = tuple(f for f in p.formats if f == "auto" or state.target is None or state.target.supports("linear", f))
    if not formats:
        raise ConfigError(f"target {state.target.name} supports none of the recipe's formats {list(p.formats)}")
    measured = tuple(f for f in formats if f != "auto")
    config = SensitivityConfig(calibration=p.calibration, tokens=p.tokens, window=p.window, formats=measured)
    table = None
    cache = None
    if state.cache_dir is not None:
        cache = state.cache_dir / f"sensitivity-{cache_key(state.model, config)}.json"
        if cache.is_file():
            table = SensitivityTable.load(cache)
    if table is None:
        ids = calibration_ids(Tokenizer(state.model.tokenizer), config)
        table = measure_sensitivity(state.model, ids, config, progress=state.progress)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            table.save(cache)
    heads = [h for h in p.head_formats if h == "auto" or state.target is None or state.target.supports("lm_head", h)]
    head_kl = _head_sensitivity(state, heads, config, table, cache)
    loss = {u: dict(v) for u, v in table.kl.items() if u != HEAD_UNIT}
    lossless = _lossless_auto(state.model)
    for u in loss:
        if "auto" in formats:  # the source's own blocks: no change, no loss (when transcoded exactly)
            loss[u]["auto"] = 0.0 if lossless else loss[u].get("int4", 0.0)
    from dataclasses import replace as with_fields

    from edgellm.compress.rtn import head_bytes, quantize_head, stored_bytes
    from edgellm.compress.solvers import solve

    stored = state.model.weights
    unit_list = [with_fields(u, auto_bytes=sum(stored_bytes(stored[f"{m}.weight"]) for m in u.members))
                 for u in units(state.model.config)]
    best, tried = None, {}
    for head in heads:  # an exact outer choice: one solve per lm_head format
        freed = head_bytes(state.model, "auto") - head_bytes(state.model, head)
        budget = Budget(max_bytes=None if state.budget_bytes is None else state.budget_bytes + freed,
                        max_us=state.budget_us)
        try:
            result = solve(p.solver, unit_list, formats, loss, budget, cost_us=state.cost_us,
                           seed=state.seed, episodes=p.episodes, progress=state.progress)
        except ConfigError as exc:
            tried[head] = str(exc)
            continue
        tried[head] = result.loss + head_kl[head]
        if best is None or tried[head] < best[0]:
            best = (tried[head], head, result)
    if best is None:
        raise ConfigError("; ".join(f"lm_head {h}: {why}" for h, why in tried.items()))
    _, head, result = best
    quantize_head(state.model, head)
    state.plan = result.plan(state.plan, name="allocated")
    state.report["allocate"] = {"solver": result.solver, "predicted_kl": best[0], "linear_bytes": result.bytes,
                                "linear_us": result.us, "choice": result.choice, "lm_head": head,
                                "lm_head_tried": tried, "head_bytes": head_bytes(state.model, "auto"),
                                "format_counts": {f: list(result.choice.values()).count(f) for f in formats}}


def _head_sensitivity(state: CompressState, heads: list[str], config, table, cache) -> dict[str, float]:
    """KL of each lm_head format (0 for "auto"), measured once and kept in the unit table's cache."""
    from edgellm.compress.sensitivity import HEAD_UNIT, calibration_ids, measure_head_sensitivity
    from edgellm.model.tokenizer import Tokenizer

    known = table.kl.setdefault(HEAD_UNIT, {})
    missing = [f for f in heads if f != "auto" and f not in known]
    if missing:
        ids = calibration_ids(Tokenizer(state.model.tokenizer), config)
        known.update(measure_head_sensitivity(state.model, ids, config, missing))
        if cache is not None:
            table.save(cache)
    return {f: 0.0 if f == "auto" else known[f] for f in heads}


def _lossless_auto(model: ModelDescription) -> bool:
    from edgellm.export.block_formats import LOSSLESS_TRANSCODERS
    from edgellm.model.tensor_names import LINEAR_ROLES

    return all(model.weights[f"blk.{i}.{role}.weight"].qtype in LOSSLESS_TRANSCODERS
               for i in range(model.config.n_layers) for role in LINEAR_ROLES)


@dataclass(frozen=True)
class GptqParams:
    """GPTQ error correction for every linear unit, from activations on calibration text."""

    bits: int = 4
    symmetric: bool = False
    block_size: int = 32
    calibration: str = "asyoulik.txt"
    tokens: int = 512
    window: int = 256
    damp: float = 0.01
    act_order: bool = False
    skip_first: int = 0  # leading positions of each window left out of H (attention-sink rows dominate it)

    def __post_init__(self) -> None:
        if not 0 <= self.skip_first < self.window:
            raise ValueError(f"skip_first must be in [0, window), found {self.skip_first}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits {self.bits} unsupported; valid: 2, 3, 4, 8")
        if self.tokens < self.window or self.window < 2:
            raise ValueError(f"need tokens >= window >= 2, found tokens={self.tokens} window={self.window}")


@register_pass("gptq", GptqParams)
def gptq_pass(state: CompressState, p: GptqParams) -> None:
    """Quantize layer by layer with GPTQ: each layer's units see the inputs the already-quantized earlier
    layers produce (as in the paper); the results replace the weights and the plan keeps them ("auto")."""
    import numpy as np
    import torch

    from edgellm.compress.sensitivity import SensitivityConfig, calibration_ids
    from edgellm.compress.units import units
    from edgellm.model.llama import KVCache, LlamaModel

    model = state.model
    ids = calibration_ids(_tokenizer(model), SensitivityConfig(calibration=p.calibration, tokens=p.tokens,
                                                                window=p.window))
    ref = LlamaModel(model)
    cfg = ref.config
    tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    with torch.no_grad():
        hidden = [ref.embed(tokens[s:s + p.window]) for s in range(0, len(tokens) - p.window + 1, p.window)]
    by_layer: dict[int, list] = {}
    for u in units(cfg):
        by_layer.setdefault(u.layer, []).append(u)
    ratios: list[float] = []
    layers = range(cfg.n_layers)
    if state.progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="gptq", unit="layer")
    for i in layers:
        ref.capture = {}
        with torch.no_grad():
            for h in hidden:  # record this layer's unit inputs (earlier layers already quantized)
                ref.run_layers(h, KVCache.allocate(cfg, i, i + 1, h.shape[0]), i, i + 1)
        inputs = {name: torch.cat([part[p.skip_first:] for part in parts]).numpy().astype(np.float32)
                  for name, parts in ref.capture.items()}
        ref.capture = None
        for unit in by_layer[i]:
            ratios.append(_gptq_unit(state, ref, unit, inputs[unit.name], p))
        with torch.no_grad():  # advance the calibration stream through the quantized layer
            hidden = [ref.run_layers(h, KVCache.allocate(cfg, i, i + 1, h.shape[0]), i, i + 1) for h in hidden]
    state.plan = CompressionPlan(default="auto", lm_head=state.plan.lm_head, accuracy_level=state.plan.accuracy_level,
                                 lm_head_accuracy_level=state.plan.lm_head_accuracy_level,
                                 name=f"gptq-int{p.bits}{'-sym' if p.symmetric else ''}")
    state.report["gptq"] = {"bits": p.bits, "symmetric": p.symmetric, "units": len(ratios),
                            "calibration_tokens": len(ids),
                            "output_error_vs_rtn_median": float(np.median(ratios)),
                            "output_error_vs_rtn_max": float(np.max(ratios))}


def _gptq_unit(state: CompressState, ref, unit, x, p: GptqParams) -> float:
    """GPTQ one fused unit, write its member weights back (description and live model); returns the
    calibration output error relative to round-to-nearest."""
    import numpy as np
    import torch

    from edgellm.compress.gptq import gptq_quantize
    from edgellm.export.block_formats import quantize_rtn
    from edgellm.model.weights import WeightTensor

    weights = state.model.weights
    w = np.concatenate([weights.float(f"{m}.weight") for m in unit.members])
    bq = gptq_quantize(w, x, p.bits, p.block_size, p.symmetric, p.damp, p.act_order)
    rtn = quantize_rtn(w, p.bits, p.block_size, p.symmetric)
    exact = x @ w.T
    ratio = float(np.linalg.norm(exact - x @ bq.dequantize().T) /
                  max(float(np.linalg.norm(exact - x @ rtn.dequantize().T)), 1e-30))
    start = 0
    for m in unit.members:
        rows = weights[f"{m}.weight"].shape[0]
        part = bq.rows(start, start + rows)
        weights.replace(f"{m}.weight", WeightTensor.from_blocks(f"{m}.weight", part))
        ref.layers[unit.layer][m.split(".", 2)[2]] = torch.from_numpy(part.dequantize())
        start += rows
    return ratio


def _tokenizer(model: ModelDescription):
    from edgellm.model.tokenizer import Tokenizer

    return Tokenizer(model.tokenizer)
