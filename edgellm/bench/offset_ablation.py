"""Where the lossless export's decode time goes, measured in one interleaved run.

    python -m edgellm.bench.offset_ablation [--rounds 5] [--json bench_results/offset_ablation.json]

Engines: the default export (edgellm's BlockMatMul on the GGUF blocks), the stock-op lossless export
(`--kernel matmulnbits`: Q4_1 as MatMulNBits' int4 kernel plus the exact per-block offset correction),
that graph without the correction (offset_sums="drop": NOT the model's weights, its perplexity shows
it; a timing ablation only), and llama.cpp on the GGUF. Then ONNX Runtime profiles of decode steps of
both exact exports, by op type: how much of the stock graph's time is the correction, and what the
custom op leaves.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def decode_profile(directory: Path, threads: int = 2, prompt: int = 64, steps: int = 32) -> dict[str, dict]:
    """Per op type: share of kernel time, nodes and microseconds per decode step (profiler overhead
    included, so absolute times are inflated; the shares are what to read)."""
    from edgellm.model.loader import load_model
    from edgellm.runtime.onnxruntime_cpu import OrtBackend

    with tempfile.TemporaryDirectory(prefix="edgellm-profile-") as tmp:
        model = load_model(directory)
        backend = OrtBackend(model.config, directory, threads=threads, profile_dir=tmp)
        session = backend.open_session(max_tokens=prompt + steps + 1)
        session.forward(np.arange(100, 100 + prompt) % model.config.vocab_size)
        for i in range(steps):
            session.forward(np.array([(300 + i) % model.config.vocab_size]))
        events = json.loads(Path(backend.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_decode = sorted(e["ts"] for e in runs)[1]  # run 0 is the prefill
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_decode:
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    all_us = sum(total.values())
    return {op: {"share": us / all_us, "nodes_per_step": count[op] / steps, "us_per_step": us / steps}
            for op, us in total.most_common()}


def main(argv: list[str] | None = None) -> int:
    from edgellm.bench import speed
    from edgellm.export.onnx_export import export_onnx
    from edgellm.export.onnx_graph import LoweringOptions
    from edgellm.model.loader import load_model
    from edgellm.model.tokenizer import Tokenizer

    p = argparse.ArgumentParser(prog="python -m edgellm.bench.offset_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="a GGUF with Q4_1 linears (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--json", default=None, metavar="OUT")
    a = p.parse_args(argv)
    model = load_model(a.model)
    if not str(model.source).lower().endswith(".gguf"):
        print(f"error: {model.source} is not a GGUF file (llama.cpp runs beside the exports)", file=sys.stderr)
        return 2
    config = speed.BenchConfig(threads=a.threads, rounds=a.rounds, reps=a.reps, ppl_tokens=a.ppl_tokens)
    with tempfile.TemporaryDirectory(prefix="edgellm-ablation-") as tmp:
        default = export_onnx(model, Path(tmp) / "block-kernel", progress=True)
        exact = export_onnx(load_model(a.model), Path(tmp) / "lossless", progress=True,
                            options=LoweringOptions(block_kernel="matmulnbits"))
        dropped = export_onnx(load_model(a.model), Path(tmp) / "no-offsets", progress=True,
                              options=LoweringOptions(offset_sums="drop", block_kernel="matmulnbits"))

        engines = [speed.Engine.onnx_dir("edgellm-ort", "onnxruntime", default),
                   speed.Engine.onnx_dir("ort:matmulnbits", "onnxruntime", exact),
                   speed.Engine.onnx_dir("ort:no-offsets", "onnxruntime", dropped),
                   speed.Engine("llama.cpp", "llama.cpp", str(model.source), (Path(model.source),))]
        tok = Tokenizer(model.tokenizer)
        result = speed.run_bench(engines, tok, config, ppl_fn=speed.alice_perplexity(tok, config) if config.ppl_tokens else None,
                           log=lambda s: print(s, file=sys.stderr))
        speed.add_ratios(result, "edgellm-ort", ["ort:matmulnbits", "ort:no-offsets"])
        speed.add_ratios(result, "ort:matmulnbits", ["ort:no-offsets"])
        result["decode_profile"] = decode_profile(exact, a.threads)
        result["decode_profile_block_kernel"] = decode_profile(default, a.threads)
    print(speed.format_table(result))
    for key, what in (("decode_profile", "stock-op lossless export (MatMulNBits + offset correction)"),
                      ("decode_profile_block_kernel", "default export (edgellm BlockMatMul)")):
        print(f"\n{what}, decode steps, ONNX Runtime profiler (share of kernel time):")
        for op, row in result[key].items():
            print(f"  {op:34s} {100 * row['share']:5.1f} %  {row['nodes_per_step']:6.1f} nodes/step")
    if a.json:
        print(f"wrote {speed.write_result(result, a.json)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
