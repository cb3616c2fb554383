"""ONNX Runtime GenAI as a comparison engine for `edgellm bench --genai`: the off-the-shelf path.

Its model builder takes a Hugging Face checkpoint, so the GGUF is dequantized (transformers reads it)
and rebuilt as GenAI's int4 (symmetric round-to-nearest, blocks of 32): the weights are *not* the
GGUF's (shared/notes/baselines.md: perplexity 22.7 -> 29.4). Built once per GGUF and cached:

    ~/.cache/edgellm/genai/<sha256 of the GGUF, 16 hex>-int4/   (genai_config.json, model.onnx, ...)

(EDGELLM_GENAI_CACHE moves that folder; EDGELLM_CACHE moves every edgellm cache.)

Timing and perplexity use GenAI's own Generator, with the bench's prompt token ids and threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgellm.bench.speed import GENAI_BACKEND
from edgellm.errors import ConfigError, missing_extra


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise missing_extra("onnxruntime-genai", "bench") from exc
    return og


def cache_root() -> Path:
    if os.environ.get("EDGELLM_GENAI_CACHE"):
        return Path(os.environ["EDGELLM_GENAI_CACHE"])
    root = os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm"
    return Path(root) / "genai"


def build_int4(gguf: Path, threads: int = 2, cache: Path | None = None, log=print) -> Path:
    """The GenAI int4 model of `gguf`, built on first use (dequantize -> HF checkpoint -> GenAI builder)."""
    from edgellm.model.artifact import sha256_file

    out = (cache or cache_root()) / f"{sha256_file(gguf)[:16]}-int4"
    if (out / "genai_config.json").is_file():
        _set_threads(out, threads)
        return out
    _genai()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".genai-build-", dir=out.parent) as tmp:
        hf, built = Path(tmp) / "hf", Path(tmp) / "int4"
        log(f"ONNX Runtime GenAI: dequantizing {gguf.name} to a Hugging Face checkpoint")
        _gguf_to_hf(gguf, hf)
        log("ONNX Runtime GenAI: model builder, int4, cpu")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(built),
               "-p", "int4", "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (built / "genai_config.json").is_file():
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError(f"the ONNX Runtime GenAI model builder failed: {last}")
        built.rename(out)  # whole directory or nothing: a half-built model is never found in the cache
    _set_threads(out, threads)
    return out


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # transformers refuses to save a "gguf-quantized" model
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _set_threads(model_dir: Path, threads: int) -> None:
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") == threads:
        return
    options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2))
    tmp.replace(path)


def _generator(og, model, max_length: int):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    return og.Generator(model, params)


def run(model_dir: str, prompt: list[int], n_decode: int, reps: int,
        on_ready: Callable[[], None] = lambda: None) -> dict:
    """The speed worker's measurements (load, TTFT, prefill and greedy decode) for a GenAI model;
    `on_ready` is called once the model is loaded and warm (the worker records its RSS there)."""
    og = _genai()
    t0 = time.perf_counter()
    model = og.Model(model_dir)
    warm = _generator(og, model, 16)
    warm.append_tokens(prompt[:8])
    load_s = time.perf_counter() - t0
    on_ready()
    runs = []
    for _ in range(reps):
        gen = _generator(og, model, len(prompt) + n_decode + 1)
        t = time.perf_counter()
        gen.append_tokens(prompt)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n_decode):
            gen.generate_next_token()
        decode_s = time.perf_counter() - t
        runs.append({"ttft_ms": prefill_s * 1e3, "prefill_tok_s": len(prompt) / prefill_s,
                     "decode_tok_s": n_decode / decode_s})
    return {"engine": GENAI_BACKEND, "load_s": load_s, "runs": runs}


def perplexity(model_dir: str, ids: list[int], window: int = 512) -> float:
    """baselines.md's convention: windows of `window` from an empty cache, every prediction after the
    first token counted, log-softmax in float64. GenAI returns the last position's logits only, so the
    window is fed one token at a time."""
    og = _genai()
    model = og.Model(model_dir)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        gen = _generator(og, model, len(chunk) + 1)
        for pos, token in enumerate(chunk[:-1]):
            gen.append_tokens([token])
            logits = np.asarray(gen.get_logits(), dtype=np.float64).reshape(-1)
            top = logits.max()
            nll += top + np.log(np.exp(logits - top).sum()) - logits[chunk[pos + 1]]
            count += 1
    if count == 0:
        raise ConfigError("perplexity needs at least two tokens")
    return float(np.exp(nll / count))
