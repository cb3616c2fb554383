"""Structured pruning: remove whole attention KV groups and FFN channels, so the tensors really shrink.

A KV group is one key/value head with the query heads that read it (n_heads / n_kv_heads of them):
removing it deletes rows of Q, K, V and columns of O, and GQA stays consistent (every remaining kv head
keeps its full group). An FFN channel is a row of gate and up and a column of down. Per-layer head
counts and FFN sizes then differ, so the model config records them (`layer_n_heads`, ...).

Importance of a structure, two estimates:

  importance = "fisher"  (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
      Transformers") a gate m multiplies each query head's and FFN channel's output (LlamaModel.gates);
      the loss increase of removing structure S is ~ 1/2 sum_windows (d NLL_window / d m_S)^2 on
      calibration text (a KV group's gradient is the sum of its query heads'). In loss units, so
      structures of different layers and kinds compare directly.
  importance = "energy"  (default) what the structure adds to the residual stream, relative to the
      stream entering the layer: FFN channel j: sum_t a_tj^2 ||W_down[:, j]||^2 / sum_t ||x_t||^2,
      KV group g: ||O[:, cols_g] W_o[:, cols_g]^T||_F^2 / sum_t ||x_t||^2  (a = silu(gate) * up,
      O = the attention output before o_proj).

  Measured on SmolLM2-135M, global allocation, refit on: at 20 % of the layers' weights, validation
  perplexity (asyoulik.txt tail, dense 36.5) energy 47.7, fisher 48.8, fisher without refit 50.4,
  fisher with uniform layer ratios 57.5, fisher with OWL ratios 58.3; at 20 % of the model, alice29
  perplexity (dense 22.70) energy 53.5, fisher 56.6. Energy is also ~2x cheaper to compute.

Structures are removed cheapest first by importance per parameter until the target is gone: `sparsity`
of all the model's parameters (`of = "model"`, the convention of LLM-Pruner and FLAP; the embedding is
never pruned, so the decoder layers lose more than `sparsity` of their weights) or of the decoder
layers' linear weights only (`of = "layers"`):

  allocation = "global"   one ranking over all layers (importance-based non-uniform layer ratios)
  allocation = "owl"      per-layer targets from each layer's outlier ratio (OWL), ranked within layers
  allocation = "uniform"  the same fraction in every layer, ranked within layers

FFN channels go in chunks of `ffn_multiple` (kept sizes stay multiples of the quantizers' block size).
With `refit`, each layer's output projections (ffn_down, attn_output) are refitted by ridge least
squares so the kept structures reproduce the dense layer's output on the calibration inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from edgellm.compress.recipe import register_pass
from edgellm.errors import ConfigError

log = logging.getLogger(__name__)

ALLOCATIONS = ("global", "owl", "uniform")
IMPORTANCES = ("fisher", "energy")


@dataclass(frozen=True)
class Item:
    """One removable structure (or chunk of FFN channels) of one layer."""

    layer: int
    kind: str  # "kv_group" or "ffn"
    index: tuple[int, ...]  # group index, or the channel indices of the chunk
    score: float
    params: int


@dataclass
class LayerStats:
    """Per-layer importance scores from calibration activations."""

    channel_scores: np.ndarray  # (F,)
    group_scores: np.ndarray  # (n_kv,)
    outlier_ratio: float = 0.0


@dataclass(frozen=True)
class StructuredParams:
    """Remove `sparsity` of the model's parameters (or of the layers' linears) as KV groups and FFN channels."""

    sparsity: float = 0.2
    of: str = "model"  # "model": of all parameters (embedding included, never pruned); "layers": of layer linears
    allocation: str = "global"
    importance: str = "energy"
    fisher_window: int = 128  # tokens per window: one squared gradient per window
    heads: bool = True  # allow removing KV groups (else FFN channels only)
    ffn_multiple: int = 32
    max_layer_sparsity: float = 0.6  # no layer loses more than this fraction of its linear weights
    refit: bool = True
    refit_damp: float = 0.01
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    calibration: str = "asyoulik.txt"
    tokens: int = 2048
    window: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be a fraction in (0, 1), found {self.sparsity!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation {self.allocation!r} unknown; valid: {', '.join(ALLOCATIONS)}")
        if self.of not in ("model", "layers"):
            raise ConfigError(f"of {self.of!r} unknown; valid: model, layers")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance {self.importance!r} unknown; valid: {', '.join(IMPORTANCES)}")
        if not 2 <= self.fisher_window <= self.tokens:
            raise ConfigError(f"fisher_window must be in [2, tokens], found {self.fisher_window}")
        if not self.sparsity <= self.max_layer_sparsity < 1:
            raise ConfigError(f"max_layer_sparsity must be in [sparsity, 1), found {self.max_layer_sparsity}")
        if type(self.ffn_multiple) is not int or self.ffn_multiple < 1:
            raise ConfigError(f"ffn_multiple must be a positive integer, found {self.ffn_multiple!r}")
        if self.allocation == "owl" and not 0 <= self.owl_lambda <= min(self.sparsity, 1 - self.sparsity):
            raise ConfigError(f"owl_lambda must be in [0, min(sparsity, 1 - sparsity)], found {self.owl_lambda}")
        if self.refit_damp < 0:
            raise ConfigError(f"refit_damp must be >= 0, found {self.refit_damp}")
        if self.tokens < self.window or self.window < 2:
            raise ConfigError(f"need tokens >= window >= 2, found tokens={self.tokens} window={self.window}")


def layer_linear_params(cfg, layer: int) -> int:
    h = cfg.hidden_size
    return h * (2 * cfg.q_size_at(layer) + 2 * cfg.kv_size_at(layer)) + 3 * h * cfg.ffn_size_at(layer)


def candidate_items(cfg, stats: list[LayerStats], p: StructuredParams) -> list[Item]:
    """Every removable structure: each layer's KV groups and its FFN channels in chunks, cheapest first
    within the layer (so a ranking by score per parameter takes a layer's chunks in order)."""
    h, d = cfg.hidden_size, cfg.head_dim
    items = []
    for i, s in enumerate(stats):
        group = cfg.n_heads_at(i) // cfg.n_kv_heads_at(i)
        if p.heads:
            for g, score in enumerate(s.group_scores):
                items.append(Item(i, "kv_group", (g,), float(score), h * (2 * group * d + 2 * d)))
        order = np.argsort(s.channel_scores, kind="stable")
        for c in range(len(order) // p.ffn_multiple):
            chunk = order[c * p.ffn_multiple:(c + 1) * p.ffn_multiple]
            items.append(Item(i, "ffn", tuple(int(j) for j in chunk), float(s.channel_scores[chunk].sum()),
                              3 * h * len(chunk)))
    return items


def select(cfg, items: list[Item], targets: dict[int | None, float], p: StructuredParams) -> list[Item]:
    """Greedy by score per parameter. targets: layer -> parameters to remove there, or {None: total}
    for one global ranking. A layer keeps >= 1 KV group, >= 1 FFN chunk and <= max_layer_sparsity loss;
    an item is taken only while it brings the removed count closer to its target."""
    removed_in = dict.fromkeys(range(cfg.n_layers), 0)
    groups_left = {i: cfg.n_kv_heads_at(i) for i in range(cfg.n_layers)}
    ffn_left = {i: cfg.ffn_size_at(i) for i in range(cfg.n_layers)}
    removed_for = dict.fromkeys(targets, 0)
    chosen = []
    for it in sorted(items, key=lambda it: (it.score / it.params, it.layer)):
        key = None if None in targets else it.layer
        if key not in targets or removed_for[key] + it.params / 2 > targets[key]:
            continue
        if removed_in[it.layer] + it.params > p.max_layer_sparsity * layer_linear_params(cfg, it.layer):
            continue
        if it.kind == "kv_group" and groups_left[it.layer] <= 1:
            continue
        if it.kind == "ffn" and ffn_left[it.layer] - len(it.index) < p.ffn_multiple:
            continue
        chosen.append(it)
        removed_in[it.layer] += it.params
        removed_for[key] += it.params
        if it.kind == "kv_group":
            groups_left[it.layer] -= 1
        else:
            ffn_left[it.layer] -= len(it.index)
    return chosen


def layer_targets(cfg, stats: list[LayerStats], p: StructuredParams,
                  model_params: int | None = None) -> dict[int | None, float]:
    """Parameters to remove: {None: total} for the global ranking, else per layer. `model_params` (all of
    the model's parameters) is the base when p.of == "model"."""
    total = sum(layer_linear_params(cfg, i) for i in range(cfg.n_layers))
    fraction = p.sparsity * (model_params or total) / total if p.of == "model" else p.sparsity
    if fraction > p.max_layer_sparsity:
        raise ConfigError(f"sparsity {p.sparsity} of the model is {fraction:.3f} of the layers' linear weights, "
                          f"above max_layer_sparsity {p.max_layer_sparsity}; lower sparsity or raise the cap")
    if p.allocation == "global":
        return {None: fraction * total}
    if p.allocation == "uniform":
        ratios = [fraction] * cfg.n_layers
    else:
        from edgellm.compress.prune import owl_sparsities

        ratios = owl_sparsities([s.outlier_ratio for s in stats], fraction, min(p.owl_lambda, fraction, 1 - fraction))
    return {i: float(r) * layer_linear_params(cfg, i) for i, r in enumerate(ratios)}


def layer_stats(ref, inputs: dict[str, np.ndarray], layer: int, owl_m: float | None = None) -> LayerStats:
    """Importance of each FFN channel and KV group of `layer` from its calibration inputs."""
    cfg, w = ref.config, ref.layers[layer]
    energy = max(float((inputs["hidden"].astype(np.float64) ** 2).sum()), 1e-30)
    act = inputs[f"blk.{layer}.ffn_down"].astype(np.float64)  # (T, F)
    down = w["ffn_down"].numpy().astype(np.float64)  # (H, F)
    channel = (act ** 2).sum(0) * (down ** 2).sum(0) / energy
    attn = inputs[f"blk.{layer}.attn_output"].astype(np.float64)  # (T, q)
    o = w["attn_output"].numpy().astype(np.float64)  # (H, q)
    width = cfg.n_heads_at(layer) // cfg.n_kv_heads_at(layer) * cfg.head_dim  # columns per KV group
    groups = np.array([float(((attn[:, c:c + width] @ o[:, c:c + width].T) ** 2).sum()) / energy
                       for c in range(0, attn.shape[1], width)])
    ratio = 0.0
    if owl_m is not None:
        from edgellm.compress.prune import outlier_ratio, wanda_scores
        from edgellm.compress.units import UNIT_ROLES

        scores = [wanda_scores(w[m].numpy(), (inputs[f"blk.{layer}.{unit}"].astype(np.float64) ** 2).sum(0))
                  for unit, members in UNIT_ROLES.items() for m in members]
        ratio = outlier_ratio(scores, owl_m)
    return LayerStats(channel, groups, ratio)


def fisher_scores(ref, ids: list[int], window: int, progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (FFN channel scores (F,), KV group scores (n_kv,)): 1/2 sum over windows of the squared
    gradient of the window's mean next-token NLL with respect to each structure's gate."""
    import torch
    import torch.nn.functional as F

    cfg = ref.config
    gates = {}
    for i in range(cfg.n_layers):
        gates[f"blk.{i}.attn"] = torch.ones(cfg.n_heads_at(i), requires_grad=True)
        gates[f"blk.{i}.ffn"] = torch.ones(cfg.ffn_size_at(i), requires_grad=True)
    sums = {name: torch.zeros(cfg.n_kv_heads_at(int(name.split(".")[1])) if name.endswith("attn") else g.shape[0],
                              dtype=torch.float64) for name, g in gates.items()}
    starts = range(0, len(ids) - window + 1, window)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="structured: fisher", unit="window")
    ref.gates = gates
    try:
        for s in starts:
            tokens = torch.as_tensor(np.asarray(ids[s:s + window], dtype=np.int64))
            logits, _ = ref.trace(tokens)
            loss = F.cross_entropy(logits[:-1], tokens[1:])
            for name, grad in zip(gates, torch.autograd.grad(loss, list(gates.values())), strict=True):
                if name.endswith("attn"):  # a KV group's gate multiplies all its query heads
                    grad = grad.view(sums[name].shape[0], -1).sum(1)
                sums[name] += grad.to(torch.float64) ** 2
    finally:
        ref.gates = None
    return [(0.5 * sums[f"blk.{i}.ffn"].numpy(), 0.5 * sums[f"blk.{i}.attn"].numpy()) for i in range(cfg.n_layers)]


def shrink_layer(weights: dict, cfg, layer: int, drop_groups: set[int], drop_channels: set[int],
                 inputs: dict[str, np.ndarray] | None = None, damp: float = 0.01) -> dict[str, np.ndarray]:
    """The layer's linears (numpy (N, K) by role) without the given KV groups and FFN channels; with
    `inputs`, the output projections are refitted to the dense layer's outputs on them."""
    d = cfg.head_dim
    group = cfg.n_heads_at(layer) // cfg.n_kv_heads_at(layer)
    keep_groups = [g for g in range(cfg.n_kv_heads_at(layer)) if g not in drop_groups]
    q_rows = np.concatenate([np.arange(g * group * d, (g + 1) * group * d) for g in keep_groups])
    kv_rows = np.concatenate([np.arange(g * d, (g + 1) * d) for g in keep_groups])
    keep_ch = np.array([j for j in range(cfg.ffn_size_at(layer)) if j not in drop_channels])
    w = {role: np.asarray(v, dtype=np.float32) for role, v in weights.items()}
    out = {"attn_q": w["attn_q"][q_rows], "attn_k": w["attn_k"][kv_rows], "attn_v": w["attn_v"][kv_rows],
           "attn_output": w["attn_output"][:, q_rows], "ffn_gate": w["ffn_gate"][keep_ch],
           "ffn_up": w["ffn_up"][keep_ch], "ffn_down": w["ffn_down"][:, keep_ch]}
    if inputs is not None:
        if drop_groups:
            out["attn_output"] = refit(inputs[f"blk.{layer}.attn_output"], w["attn_output"], q_rows, damp)
        if drop_channels:
            out["ffn_down"] = refit(inputs[f"blk.{layer}.ffn_down"], w["ffn_down"], keep_ch, damp)
    return {role: np.ascontiguousarray(v) for role, v in out.items()}


def refit(x: np.ndarray, w: np.ndarray, keep: np.ndarray, damp: float) -> np.ndarray:
    """Weights (N, len(keep)) on the kept input columns that best reproduce x @ w.T (ridge least squares):
    W' = (G_kk + damp * mean(diag G_kk) I)^-1 G_k: W^T, with G = x^T x."""
    x64 = x.astype(np.float64)
    gram = x64.T @ x64  # (K, K)
    g_kk = gram[np.ix_(keep, keep)]
    g_kk[np.diag_indices(len(keep))] += damp * max(float(np.mean(np.diag(g_kk))), 1e-12)
    rhs = gram[keep] @ w.astype(np.float64).T  # (K', N)
    return np.linalg.solve(g_kk, rhs).T.astype(np.float32)


def _with_layer_shape(cfg, layer: int, n_heads: int, n_kv: int, ffn: int):
    """cfg with one layer's shapes changed (per-layer tuples filled from the global values first)."""
    heads = list(cfg.layer_n_heads or [cfg.n_heads] * cfg.n_layers)
    kvs = list(cfg.layer_n_kv_heads or [cfg.n_kv_heads] * cfg.n_layers)
    ffns = list(cfg.layer_ffn_sizes or [cfg.ffn_size] * cfg.n_layers)
    heads[layer], kvs[layer], ffns[layer] = n_heads, n_kv, ffn
    return dataclasses.replace(cfg, layer_n_heads=tuple(heads), layer_n_kv_heads=tuple(kvs),
                               layer_ffn_sizes=tuple(ffns))


@register_pass("prune_structured", StructuredParams)
def prune_structured_pass(state, p: StructuredParams) -> None:
    """Score every structure on the dense model, choose what to remove, then shrink layer by layer
    (each refit sees the already-shrunk earlier layers' outputs)."""
    import torch

    from edgellm.compress.calibration import calibration_tokens, layer_stream
    from edgellm.model.llama import LlamaModel
    from edgellm.model.weights import WeightTensor

    model = state.model
    cfg0 = model.config
    ids = calibration_tokens(model, p.calibration, p.tokens, p.window)
    ref = LlamaModel(model)
    owl_m = p.owl_m if p.allocation == "owl" else None
    if p.importance == "energy" or owl_m is not None:
        stats = [layer_stats(ref, inputs, i, owl_m) for i, inputs in
                 layer_stream(ref, ids, p.window, state.progress, "structured: score", with_hidden=True)]
    if p.importance == "fisher":
        fisher = fisher_scores(ref, ids, p.fisher_window, state.progress)
        stats = [LayerStats(c, g, stats[i].outlier_ratio if owl_m is not None else 0.0)
                 for i, (c, g) in enumerate(fisher)]
    all_params = sum(int(np.prod(t.shape)) for t in model.weights.values())
    chosen = select(cfg0, candidate_items(cfg0, stats, p), layer_targets(cfg0, stats, p, all_params), p)
    drops: dict[int, tuple[set[int], set[int]]] = {i: (set(), set()) for i in range(cfg0.n_layers)}
    for it in chosen:
        drops[it.layer][0 if it.kind == "kv_group" else 1].update(it.index)
    roles = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    for i, inputs in layer_stream(ref, ids, p.window, state.progress, "structured: shrink"):
        groups, channels = drops[i]
        if not groups and not channels:
            continue
        cfg = ref.config
        new = shrink_layer({r: ref.layers[i][r].numpy() for r in roles}, cfg, i, groups, channels,
                           inputs if p.refit else None, p.refit_damp)
        group = cfg.n_heads_at(i) // cfg.n_kv_heads_at(i)
        n_kv = cfg.n_kv_heads_at(i) - len(groups)
        ref.config = _with_layer_shape(cfg, i, n_kv * group, n_kv, cfg.ffn_size_at(i) - len(channels))
        for role, values in new.items():
            ref.layers[i][role] = torch.from_numpy(values)
            name = f"blk.{i}.{role}.weight"
            model.weights.replace(name, WeightTensor.from_array(name, values))
            state.rewritten.add(name)
    model.config = ref.config
    model.validate()
    total = sum(layer_linear_params(cfg0, i) for i in range(cfg0.n_layers))
    removed = total - sum(layer_linear_params(model.config, i) for i in range(cfg0.n_layers))
    state.report["prune_structured"] = {
        "allocation": p.allocation, "importance": p.importance, "target_sparsity": p.sparsity, "of": p.of,
        "removed_layer_linear_fraction": removed / total, "removed_fraction_of_all_parameters": removed / all_params,
        "parameters_before": all_params, "parameters_after": all_params - removed, "calibration_tokens": len(ids),
        "kv_groups_removed": sum(len(g) for g, _ in drops.values()),
        "ffn_channels_removed": sum(len(c) for _, c in drops.values()),
        "layer_n_heads": list(model.config.layer_n_heads), "layer_ffn_sizes": list(model.config.layer_ffn_sizes),
        "layer_sparsity": [round(1 - layer_linear_params(model.config, i) / layer_linear_params(cfg0, i), 4)
                           for i in range(cfg0.n_layers)],
        "owl_outlier_ratios": [s.outlier_ratio for s in stats] if owl_m is not None else [],
    }
    log.info("structured pruning removed %.3f of the layers' linear weights", removed / total)
