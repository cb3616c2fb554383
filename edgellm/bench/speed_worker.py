"""One engine, one fresh process: load, then time prefill and greedy decode; print JSON.

Run in its own process so that peak RSS and load time belong to that engine alone.
    python -m edgellm.bench.speed_worker ENGINE MODEL --threads 2 --prompt-ids F --n-decode 128 --reps 3
With --lookup K the decode is prompt-lookup drafting (edgellm.runtime.lookup, up to K guesses per pass;
llama.cpp then keeps every position's logits), timed beside a plain greedy decode through the same loop.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np


def run(engine: str, model_path: str, threads: int, prompt: list[int], n_decode: int, reps: int) -> dict:
    t0 = time.perf_counter()
    stages = StageRss()  # where the resident set grows, per stage (the same stages for every engine)
    stages.mark("python")
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    model = load_model(model_path)
    stages.mark("model_description")
    backend = create_backend(engine, model, threads=threads)
    max_tokens = len(prompt) + n_decode + 1
    session = backend.open_session(max_tokens=max_tokens)
    session.forward(np.asarray(prompt[:8]))  # first call: kernels, allocator, thread pool warm
    load_s = time.perf_counter() - t0
    stages.mark("engine_ready")
    runs = []
    for _ in range(reps):
        session.reset()
        t = time.perf_counter()
        logits = session.forward(np.asarray(prompt))
        token = int(np.argmax(logits[-1]))
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n_decode):
            logits = session.forward(np.asarray([token]))
            token = int(np.argmax(logits[-1]))
        decode_s = time.perf_counter() - t
        runs.append({"ttft_ms": prefill_s * 1e3, "prefill_tok_s": len(prompt) / prefill_s,
                     "decode_tok_s": n_decode / decode_s})
    stages.mark("after_runs")
    return {"engine": engine, "load_s": load_s, "runs": runs, "peak_rss_mb": peak_rss_kb() / 1024, **stages.values}


def run_lookup(engine: str, model_path: str, threads: int, prompt: list[int], n_decode: int, reps: int,
               max_draft: int) -> dict:
    """Greedy decode with drafting: tokens/s, forward passes per token, and whether the tokens are the
    plain decode's (an int8-activation engine may flip a near tie between pass shapes)."""
    from edgellm.model.loader import load_model
    from edgellm.runtime.generation import decode_tokens
    from edgellm.runtime.lookup import LookupConfig
    from edgellm.runtime.registry import create_backend
    from edgellm.runtime.sampling import Sampler, SamplingConfig

    model = load_model(model_path)
    backend = create_backend(engine, model, threads=threads, **({"logits_all": True} if engine == "llama.cpp" else {}))
    session = backend.open_session(max_tokens=len(prompt) + n_decode + 1)
    greedy = SamplingConfig(greedy=True)
    # lookup_baseline_tok_s: plain decoding through the same loop in the same process, one timed run
    passes = [0]
    forward = session.forward

    def counted(inputs, all_logits=False):
        passes[0] += 1
        return forward(inputs, all_logits)

    session.forward = counted

    def decode(lookup: LookupConfig | None) -> tuple[list[int], float, int]:
        """n_decode tokens after the one the prefill gives, as run() counts them: plain decoding
        spends exactly n_decode passes on them."""
        session.reset()
        logits = session.forward(np.asarray(prompt))[-1]
        passes[0] = 0
        t = time.perf_counter()
        tokens = [tok for tok, _ in decode_tokens(session, logits, list(prompt), Sampler(greedy), n_decode + 1, lookup)]
        return tokens, time.perf_counter() - t, passes[0]

    plain, plain_s, _ = decode(None)
    runs = []
    for _ in range(reps):
        tokens, seconds, n_passes = decode(LookupConfig(max_draft=max_draft))
        differ = next((i for i, (a, b) in enumerate(zip(tokens, plain, strict=True)) if a != b), None)
        runs.append({"decode_lookup_tok_s": n_decode / seconds, "lookup_tokens_per_pass": n_decode / max(n_passes, 1),
                     "lookup_baseline_tok_s": n_decode / plain_s, "same_tokens": tokens == plain,
                     "first_difference": differ})
    return {"engine": engine, "runs": runs}


# Resident set (VmRSS) after each stage of a worker: python + numpy, edgellm's model description (config,
# tokenizer; GenAI loads none), engine loaded and warm, timed runs done. JSON keys: rss_<stage>_mb.
RSS_STAGES = ("python", "model_description", "engine_ready", "after_runs")
RSS_STAGE_KEYS = tuple(f"rss_{stage}_mb" for stage in RSS_STAGES)


class StageRss:
    """VmRSS at named stages, as the worker's JSON keys; nothing where /proc is missing."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        assert stage in RSS_STAGES, stage
        kb = _status_kb("VmRSS")
        if kb is not None:
            self.values[f"rss_{stage}_mb"] = kb / 1024


def _status_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM); None where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kb() -> int:
    """This process's peak resident set: VmHWM (reset by exec, unlike ru_maxrss, which a child inherits)."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("engine")
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-ids", required=True, help="JSON file with the prompt token ids")
    p.add_argument("--n-decode", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lookup", type=int, default=0, metavar="K", help="time prompt-lookup drafting instead")
    a = p.parse_args(argv)
    with open(a.prompt_ids) as fh:
        prompt = json.load(fh)
    from edgellm.bench.speed import GENAI_BACKEND

    if a.engine == GENAI_BACKEND:  # the comparison engine of `edgellm bench --genai` (its own API)
        from edgellm.bench.genai import run as run_genai

        if a.lookup:
            raise SystemExit("speed_worker: --lookup is not timed for onnxruntime-genai")
        stages = StageRss()
        stages.mark("python")
        out = run_genai(a.model, prompt, a.n_decode, a.reps, on_ready=lambda: stages.mark("engine_ready"))
        stages.mark("after_runs")
        print(json.dumps({**out, "peak_rss_mb": peak_rss_kb() / 1024, **stages.values}))
    elif a.lookup:
        print(json.dumps(run_lookup(a.engine, a.model, a.threads, prompt, a.n_decode, a.reps, a.lookup)))
    else:
        print(json.dumps(run(a.engine, a.model, a.threads, prompt, a.n_decode, a.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
