"""One engine, one fresh process: load, then time prefill and greedy decode; print JSON.

Run in its own process so that peak RSS and load time belong to that engine alone.
    python -m edgellm.bench.speed_worker ENGINE MODEL --threads 2 --prompt-ids F --n-decode 128 --reps 3
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
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    model = load_model(model_path)
    backend = create_backend(engine, model, threads=threads)
    max_tokens = len(prompt) + n_decode + 1
    session = backend.open_session(max_tokens=max_tokens)
    session.forward(np.asarray(prompt[:8]))  # first call: kernels, allocator, thread pool warm
    load_s = time.perf_counter() - t0
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
    return {"engine": engine, "load_s": load_s, "runs": runs, "peak_rss_mb": peak_rss_kb() / 1024}


def peak_rss_kb() -> int:
    """This process's peak resident set: VmHWM (reset by exec, unlike ru_maxrss, which a child inherits)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("engine")
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-ids", required=True, help="JSON file with the prompt token ids")
    p.add_argument("--n-decode", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    with open(a.prompt_ids) as fh:
        prompt = json.load(fh)
    print(json.dumps(run(a.engine, a.model, a.threads, prompt, a.n_decode, a.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
