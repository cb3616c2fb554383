"""Calibration activations, layer by layer: what each fused linear unit sees on calibration text.

Passes that need inputs (GPTQ, Wanda, SparseGPT, structured pruning) walk the decoder one layer at a
time: record the layer's unit inputs, let the pass change that layer, then advance the calibration
stream through the *changed* layer, so each layer is calibrated on what the compressed earlier layers
produce (sequential, as in the GPTQ/SparseGPT/Wanda papers).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edgellm.model.description import ModelDescription


def calibration_tokens(model: ModelDescription, corpus: str, tokens: int, window: int) -> list[int]:
    """The first `tokens` tokens of a Canterbury file (asyoulik.txt by convention; alice29.txt is for eval)."""
    from edgellm.compress.sensitivity import SensitivityConfig, calibration_ids
    from edgellm.model.tokenizer import Tokenizer

    return calibration_ids(Tokenizer(model.tokenizer), SensitivityConfig(calibration=corpus, tokens=tokens,
                                                                         window=window))


def layer_stream(ref, ids: list[int], window: int, progress: bool = False, desc: str = "layers",
                 with_hidden: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """For each layer i of `ref` (a LlamaModel): yield (i, unit name -> (T, K) float32 inputs over all
    windows, plus "hidden": the residual stream entering the layer when `with_hidden`); when the caller
    resumes, the stream advances through layer i as it stands then (weights and ref.config)."""
    import torch

    from edgellm.model.llama import KVCache

    cfg = ref.config
    tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    with torch.no_grad():
        hidden = [ref.embed(tokens[s:s + window]) for s in range(0, len(tokens) - window + 1, window)]
    layers = range(cfg.n_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc=desc, unit="layer")
    for i in layers:
        ref.capture = {}
        with torch.no_grad():
            for h in hidden:
                ref.run_layers(h, KVCache.allocate(cfg, i, i + 1, h.shape[0]), i, i + 1)
        inputs = {name: torch.cat(parts).numpy().astype(np.float32) for name, parts in ref.capture.items()}
        ref.capture = None
        if with_hidden:
            inputs["hidden"] = torch.cat(hidden).numpy().astype(np.float32)
        yield i, inputs
        with torch.no_grad():
            hidden = [ref.run_layers(h, KVCache.allocate(cfg, i, i + 1, h.shape[0]), i, i + 1) for h in hidden]
