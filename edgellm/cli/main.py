"""`edgellm` argument parsing and dispatch; errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edgellm import __version__
from edgellm.cli.arg_types import bounded
from edgellm.errors import EdgeLLMError

MODEL_HELP = "model: a .gguf file, a Hugging Face directory, or a model id (default: smollm2-135m-instruct)"


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes print one line (the same shape as every other edgellm error) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"edgellm: error: {self.prog}: {message} (see --help)\n")


_positive_int = bounded(int, "a positive integer", low=1)


def _non_negative_int(text: str) -> int:
    value = _positive_int(text) if text.strip() not in ("0", "+0", "-0") else 0
    return value


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)


def _add_backend(p: argparse.ArgumentParser) -> None:
    from edgellm.runtime.registry import backend_names

    p.add_argument("--backend", default=None, metavar="NAME",
                   help=f"engine to run on: {', '.join(backend_names())} (default: the one an exported "
                        "directory's manifest names, else reference)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic)")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40, help="0 disables")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--lookup", type=_non_negative_int, default=0, metavar="K",
                   help="prompt-lookup drafting: each forward pass also checks up to K tokens that followed the "
                        "context's latest n-gram match; fewer passes when the text repeats its context, the same "
                        "tokens as without (same seed when sampling) up to int8-activation rounding at near "
                        "ties (default 0 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="edgellm", description="Run generative LLMs well on small hardware.",
        epilog="Run 'edgellm COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="describe a model (architecture, shapes, tensor types)")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor with type and shape")

    p = sub.add_parser("tokenize", help="text -> token ids (JSON array)")
    _add_model(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", metavar="F", help="tokenize the whole file (read as UTF-8, as-is)")
    src.add_argument("--text", help="tokenize this string")
    p.add_argument("--special", action="store_true", help="parse special-token text such as <|im_start|>")

    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    _add_model(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print JSON with tokens and text instead of streaming")
    _add_sampling(p)
    _add_backend(p)
    from edgellm.cli.offload_command import add_offload_args

    add_offload_args(p)  # --offload URL [--offload URL2] [--objective latency|energy] [--offload-split K] ...

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model(p)
    p.add_argument("--system", default=None, help="system message")
    _add_sampling(p)
    _add_backend(p)

    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="eval_command", metavar="METRIC", required=True)
    e = esub.add_parser("ppl", help="perplexity over fixed windows (baselines.md convention)")
    _add_model(e)
    src = e.add_mutually_exclusive_group()
    src.add_argument("--text-file", metavar="F", help="text to score (read as UTF-8, line endings kept)")
    src.add_argument("--corpus", default=None, metavar="NAME",
                     help="a Canterbury corpus file, e.g. alice29.txt (default when no --text-file)")
    e.add_argument("--max-tokens", type=_non_negative_int, default=8192,
                   help="score the first N tokens (default 8192; 0 = the whole text)")
    e.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--stride", type=_positive_int, default=None, help="window step (default: = window)")
    e.add_argument("--json", action="store_true", help="print JSON")
    _add_backend(e)

    p = sub.add_parser("export", help="export a model to a deployable format")
    xsub = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    x = xsub.add_parser("onnx", help="ONNX Runtime directory: model.onnx + data + tokenizer + manifest")
    _add_model(x)
    x.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write (atomically)")
    x.add_argument("--plan", default=None, metavar="PLAN",
                   help="a plan JSON file or preset: lossless-transcode (default: GGUF blocks kept, int8 "
                        "activations), lossless-exact (fp32 activations), fp32, int8, int4")
    x.add_argument("--kernel", choices=("edgellm", "matmulnbits"), default="edgellm",
                   help="GGUF Q4_0/Q4_1/Q8_0 blocks with int8 activations: edgellm = edgellm's BlockMatMul "
                        "custom op (exact Q4_1, fastest; compiled with g++ at first load), matmulnbits = stock "
                        "ONNX Runtime ops only (MatMulNBits + offset correction; any ONNX Runtime build)")
    x.add_argument("--force", action="store_true", help="replace DIR if it exists")

    p = sub.add_parser("compress", help="run a compression recipe; writes a compressed model + plan")
    _add_model(p)
    p.add_argument("--recipe", required=True, help="a recipe TOML file or a name in models/recipes/")
    p.add_argument("--target", default=None, help="a targets/ entry whose measured costs drive the allocator")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-mb", type=float, default=None, help="model size budget in MiB: the compressed model as a file (codes + fp16 scales, as GGUF; embedding counted once)")
    budget.add_argument("--budget-ms-per-token", type=float, default=None,
                        help="decode latency budget on --target, ms per token")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="compressed model directory")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--cache-dir", default=None, help="where measured sensitivities are cached")
    p.add_argument("--hardware-in-the-loop", type=_positive_int, default=0, metavar="ROUNDS",
                   help="export the plan, time it here, correct the cost model and re-solve (up to ROUNDS)")

    from edgellm.bench.layer_profile import add_profile_parser

    add_profile_parser(sub)  # edgellm profile --target T [-o FILE] ...

    from edgellm.cli import serve_command

    serve_command.register(sub)  # edgellm serve-cloud [MODEL] --host H --port P --token T ...

    p = sub.add_parser("kernels", help="build (if needed) and describe edgellm's ONNX Runtime kernels for this CPU",
                       description="Compiles edgellm's BlockMatMul/BlockGather library for this machine now (it is "
                                   "otherwise built at the first load of an export that uses it) and prints its ISA "
                                   "path and cache location, e.g. to prepare an offline board. The cache is per CPU "
                                   "(flags) and compiler: an image built elsewhere rebuilds at first use (needs g++).")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("bench", help="speed, memory and perplexity beside llama.cpp (same model, threads, prompt)")
    _add_model(p)
    p.add_argument("--vs", default="llama.cpp", choices=["llama.cpp", "none"], help="comparison engine")
    p.add_argument("--also", action="append", default=[], metavar="DIR",
                   help="another ONNX export timed in the same interleaved rounds (repeatable), e.g. the dense "
                        "model beside a pruned one; ratios are reported against it too")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--plan", default=None, help="export plan when MODEL is not already an export")
    p.add_argument("--n-prompt", type=_positive_int, default=128, help="prompt tokens (prefill)")
    p.add_argument("--n-decode", type=_positive_int, default=128, help="generated tokens (decode)")
    p.add_argument("--prompt-corpus", default="alice29.txt", metavar="NAME",
                   help="Canterbury corpus file the prompt tokens come from: alice29.txt (default), asyoulik.txt "
                        "(verse), lcet10.txt (technical report), plrabn12.txt (epic poem)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="fresh processes per engine, interleaved")
    p.add_argument("--reps", type=_positive_int, default=2, help="timed runs per process")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="alice29 tokens for perplexity (0 skips)")
    p.add_argument("--genai", action="store_true",
                   help="add ONNX Runtime GenAI as a column: its model builder's int4 (symmetric RTN) of the same "
                        "GGUF, built once and cached under ~/.cache/edgellm/genai (needs torch and transformers)")
    p.add_argument("--lookup", type=_non_negative_int, default=0, metavar="K",
                   help="also time greedy decode with prompt-lookup drafting (up to K guesses per pass) on every "
                        "engine, in separate worker processes: decode_lookup_tok_s, lookup_tokens_per_pass")
    p.add_argument("--json", metavar="OUT", default=None, help="write the result JSON here")
    return parser


def _serve_cloud(args: argparse.Namespace) -> int:
    from edgellm.cli import serve_command

    return serve_command.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edgellm.cli import commands

    handler = {
        "info": commands.info, "tokenize": commands.tokenize, "generate": commands.generate,
        "chat": commands.chat, "eval": commands.eval_ppl, "export": commands.export,
        "bench": commands.bench, "compress": commands.compress, "profile": commands.profile,
        "serve-cloud": _serve_cloud, "kernels": commands.kernels,
    }[args.command]
    try:
        return handler(args) or 0
    except EdgeLLMError as exc:
        print(f"edgellm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable text file, full disk, ...
        print(f"edgellm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
