"""Quality vs size vs speed for a set of plans, all through the same evaluator (issue 4's results).

    python -m edgellm.bench.pareto --out bench_results/pareto     # writes pareto.json, pareto.md, pareto.png

Every plan is exported to ONNX, then scored on held-out text (alice29.txt; calibration used
asyoulik.txt) and timed for decode on this machine. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edgellm.compress.plan import CompressionPlan


def default_plans(model) -> list[tuple[str, CompressionPlan]]:
    from edgellm.compress.plan import PRESETS

    plans = [("lossless (Q4_1 transcode)", PRESETS["lossless-transcode"])]
    for fmt in ("int8", "int4-sym", "int2"):
        plans.append((f"uniform {fmt} RTN", CompressionPlan(default=fmt, name=f"rtn-{fmt}")))
    return plans


def allocated_plans(model, budgets_ms: list[float], cache_dir: Path) -> list[tuple[str, CompressionPlan]]:
    """Allocator plans for latency budgets on cpu-ort (sensitivities measured once and cached)."""
    from edgellm.compress.passes import CompressState
    from edgellm.compress.pipeline import run_recipe
    from edgellm.compress.recipe import load_recipe
    from edgellm.compress.target import load_target

    recipe = load_recipe("haq-cpu-ort")
    target = load_target("cpu-ort")
    table = target.load_cost_table()
    cfg = model.config
    fixed = table.overhead_us + table.cost_us(cfg.hidden_size, cfg.vocab_size, "int8")
    out = []
    for ms in budgets_ms:
        state = CompressState(model=model, plan=CompressionPlan(), cache_dir=cache_dir, target=target, progress=True,
                              budget_us=ms * 1e3 - fixed,
                              cost_us=lambda u, f: table.cost_us(u.k, u.n, "int4" if f == "auto" else f))
        run_recipe(state, recipe)
        out.append((f"allocator <= {ms} ms/token", state.plan))
    return out


def evaluate(model, tokenizer, name: str, plan: CompressionPlan, ppl_tokens: int, threads: int) -> dict:
    from edgellm.bench.decode_probe import decode_ms_per_token
    from edgellm.bench.perplexity import perplexity
    from edgellm.corpus import canterbury_path
    from edgellm.export.onnx_export import export_onnx
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    ids = tokenizer.encode(canterbury_path("alice29.txt").read_bytes().decode("utf-8"))[:ppl_tokens]
    with tempfile.TemporaryDirectory(prefix="edgellm-pareto-") as tmp:
        art = export_onnx(model, Path(tmp) / "onnx", plan)
        size_mb = sum(p.stat().st_size for p in art.iterdir()) / 2**20
        ppl = perplexity(create_backend("onnxruntime", load_model(art), threads=threads), ids, window=512).ppl
        ms = decode_ms_per_token(art, threads=threads)
    print(f"{name}: {size_mb:.1f} MB, ppl {ppl:.3f}, {ms:.2f} ms/token", file=sys.stderr)
    return {"name": name, "file_mb": size_mb, "ppl": ppl, "decode_ms_per_token": ms, "plan": plan.to_dict()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = min(r["ppl"] for r in rows)
    shown = [r for r in rows if r["ppl"] < 3 * best]  # a collapsed plan (e.g. uniform int2) would flatten the rest
    hidden = [r["name"] for r in rows if r not in shown]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = "osD^vP*Xh<>"
    for ax, key, label in ((axes[0], "file_mb", "exported files (MB)"),
                           (axes[1], "decode_ms_per_token", "decode ms/token (ONNX Runtime, 2 threads)")):
        for i, r in enumerate(shown):
            ax.scatter(r[key], r["ppl"], s=45, marker=markers[i % len(markers)], label=r["name"])
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity, alice29 (8192 tokens)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    title = "SmolLM2-135M: quality vs size and decode speed (edgellm plans)"
    if hidden:
        title += f"\nnot shown (ppl > 3x best): {', '.join(hidden)}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/pareto", help="output prefix")
    p.add_argument("--budgets-ms", default="6.0,6.5,7.0", help="allocator latency budgets, comma-separated")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--replot", action="store_true", help="redraw the PNG from an existing OUT.json")
    a = p.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(f"{a.out}.json").read_text()), Path(f"{a.out}.png"))
        return 0
    from edgellm.cli.commands import _default_cache
    from edgellm.model.loader import load_model
    from edgellm.model.tokenizer import Tokenizer

    model = load_model()
    tok = Tokenizer(model.tokenizer)
    budgets = [float(x) for x in a.budgets_ms.split(",") if x]
    plans = default_plans(model) + allocated_plans(model, budgets, _default_cache())
    rows = [evaluate(model, tok, name, plan, a.ppl_tokens, a.threads) for name, plan in plans]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(rows, indent=1))
    lines = ["| plan | files MB | decode ms/token | ppl |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['file_mb']:.1f} | {r['decode_ms_per_token']:.2f} | {r['ppl']:.3f} |" for r in rows]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    plot(rows, Path(f"{out}.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
