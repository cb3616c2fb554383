"""Handlers of the `edgellm` subcommands; printing lives here, never in the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError, ModelFormatError


def _load(args: argparse.Namespace):
    from edgellm.model.loader import load_model

    return load_model(args.model)


def _tokenizer(model):
    from edgellm.model.tokenizer import Tokenizer

    if model.tokenizer is None:
        raise ModelFormatError(f"{model.source}: the model carries no tokenizer")
    return Tokenizer(model.tokenizer)


def _read_text(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def info(args: argparse.Namespace) -> int:
    model = _load(args)
    cfg = model.config
    types = Counter(t.qtype for t in model.weights.values())
    data: dict[str, Any] = {
        "architecture": cfg.architecture, "name": cfg.name, "source": str(model.source),
        "file_type": model.file_type, "n_layers": cfg.n_layers, "hidden_size": cfg.hidden_size,
        "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "ffn_size": cfg.ffn_size, "vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
        "rope_theta": cfg.rope_theta, "rope_style": cfg.rope_style, "norm_eps": cfg.norm_eps,
        "tie_embeddings": cfg.tie_embeddings, "tensor_types": dict(types),
        "n_tensors": len(model.weights),
        "n_parameters": sum(int(_prod(t.shape)) for t in model.weights.values()),
        "chat_template": bool(model.tokenizer and model.tokenizer.chat_template),
    }
    artifact = model.metadata.get("artifact")
    if artifact:  # an export: weights live in the backend's files, the manifest describes them
        data["n_parameters"] = _parameter_count(cfg)
        data["tensor_types"] = dict(Counter(artifact.get("layers", {}).values()))
        data["backend"] = artifact["backend"]
        data["plan"] = artifact.get("plan", {}).get("name")
        data["file_mb"] = round(sum(f["bytes"] for f in artifact["files"].values()) / 2**20, 2)
        data.pop("n_tensors")
    if args.tensors:
        data["tensors"] = {n: {"type": t.qtype, "shape": list(t.shape)} for n, t in model.weights.items()}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key != "tensors":
            print(f"{key:>16}: {value}")
    for name, t in data.get("tensors", {}).items():
        print(f"  {name:<32} {t['type']:<6} {t['shape']}")
    return 0


def _parameter_count(cfg) -> int:
    per_layer = 2 * cfg.hidden_size + cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) \
        + cfg.q_size * cfg.hidden_size + 3 * cfg.hidden_size * cfg.ffn_size
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
    return cfg.n_layers * per_layer + cfg.vocab_size * cfg.hidden_size + cfg.hidden_size + head


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def tokenize(args: argparse.Namespace) -> int:
    model = _load(args)
    text = _read_text(args.text_file) if args.text_file else args.text
    print(json.dumps(_tokenizer(model).encode(text, parse_special=args.special)))
    return 0


def _backend(args: argparse.Namespace, model, **options):
    from edgellm.runtime.registry import backend_class, create_backend

    if args.backend is None:
        args.backend = str(model.metadata.get("backend", "reference"))
    backend_class(args.backend)  # an unknown name fails here, listing the valid ones
    if "plan" in model.metadata:  # a compressed directory: run the weights its plan produces
        if args.backend != "reference":
            raise ConfigError(f"{args.backend} cannot run a compressed directory's plan; use --backend reference "
                              f"or export it first: edgellm export onnx {model.metadata.get('path', 'DIR')} -o OUT")
        from edgellm.export.onnx_export import effective_description

        model = effective_description(model, model.metadata["plan"])
    return create_backend(args.backend, model, threads=args.threads, **options)


def _plan(args: argparse.Namespace, model):
    from edgellm.compress.plan import resolve_plan

    if args.plan is None and "plan" in model.metadata:
        return model.metadata["plan"]
    return resolve_plan(args.plan)


def _generation_config(args: argparse.Namespace):
    from edgellm.runtime.generation import GenerationConfig
    from edgellm.runtime.sampling import SamplingConfig

    sampling = SamplingConfig(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    from edgellm.runtime.lookup import LookupConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=sampling, stop=tuple(args.stop),
                            stop_at_eos=not args.ignore_eos,
                            lookup=LookupConfig(max_draft=args.lookup) if args.lookup else None)


def _lookup_options(args: argparse.Namespace, model) -> dict:
    """Drafting verifies several positions per pass: llama.cpp must keep every position's logits."""
    name = args.backend or str(model.metadata.get("backend", "reference"))  # as _backend() resolves it
    return {"logits_all": True} if args.lookup and name == "llama.cpp" else {}


def _chat_ids(model, tok, messages) -> list[int]:
    from edgellm.model.chat import render_chat

    return tok.encode(render_chat(model.tokenizer, messages), parse_special=True)


def generate(args: argparse.Namespace) -> int:
    from edgellm.runtime.generation import generate as run

    model = _load(args)
    tok = _tokenizer(model)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt_ids = _chat_ids(model, tok, [*messages, {"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
    gen = _generation_config(args)
    if args.offload:
        from edgellm.cli.offload_command import generate_offloaded

        if gen.lookup is not None:
            raise ConfigError("--lookup does not combine with --offload (the offloader plans one token per pass)")
        events = generate_offloaded(args, model, tok, prompt_ids, gen)
    else:
        backend = _backend(args, model, **_lookup_options(args, model))
        session = backend.open_session(max_tokens=min(model.config.context_length,
                                                      len(prompt_ids) + gen.max_new_tokens))
        events = run(session, tok, prompt_ids, gen)
    tokens: list[int] = []
    pieces: list[str] = []
    finish = "length"
    for event in events:
        tokens.append(event.token_id)
        pieces.append(event.text)
        finish = event.finish_reason or finish
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"tokens": tokens, "text": "".join(pieces), "prompt_tokens": len(prompt_ids),
                          "finish_reason": finish, "backend": args.backend}))
    else:
        sys.stdout.write("\n")
    return 0


def chat(args: argparse.Namespace) -> int:
    from edgellm.runtime.generation import generate as run

    model = _load(args)
    tok = _tokenizer(model)
    backend = _backend(args, model, **_lookup_options(args, model))
    gen = _generation_config(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = _chat_ids(model, tok, messages)
        session = backend.open_session(max_tokens=min(model.config.context_length, len(ids) + gen.max_new_tokens))
        reply = []
        for event in run(session, tok, ids, gen):
            reply.append(event.text)
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def eval_ppl(args: argparse.Namespace) -> int:
    from edgellm.bench.perplexity import perplexity

    if args.text_file:
        text, source = _read_text(args.text_file), args.text_file
    else:
        from edgellm.corpus import canterbury_path

        path = canterbury_path(args.corpus or "alice29.txt")
        text, source = _read_text(str(path)), str(path)
    model = _load(args)
    ids = _tokenizer(model).encode(text)
    if args.max_tokens and args.max_tokens > 0:
        ids = ids[: args.max_tokens]
    backend = _backend(args, model, logits_all=True)
    result = perplexity(backend, ids, window=args.window, stride=args.stride, progress=not args.json)
    out = {**result.to_dict(), "backend": args.backend, "model": str(model.source), "text": source,
           "n_tokens": len(ids)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.n_predictions} predictions "
              f"({result.n_windows} windows of {result.window}, backend {args.backend})")
    return 0


def export(args: argparse.Namespace) -> int:
    from edgellm.export.onnx_export import export_onnx, lowering_for

    model = _load(args)
    plan = _plan(args, model)
    out = export_onnx(model, args.output, plan, overwrite=args.force, progress=True,
                      options=lowering_for(plan, args.kernel))
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    print(f"wrote {out} ({size:.1f} MB, plan {plan.name}, opset {manifest['opset']})")
    return 0


def bench(args: argparse.Namespace) -> int:
    import tempfile

    from edgellm.bench.speed import (
        GENAI_BACKEND,
        BenchConfig,
        Engine,
        add_ratios,
        alice_perplexity,
        format_table,
        run_bench,
        write_result,
    )
    from edgellm.export.onnx_export import export_onnx
    from edgellm.model.loader import load_model

    config = BenchConfig(threads=args.threads, n_prompt=args.n_prompt, n_decode=args.n_decode, rounds=args.rounds,
                         reps=args.reps, ppl_tokens=args.ppl_tokens, lookup=args.lookup,
                         prompt_text=args.prompt_corpus)
    for extra in args.also:
        if not (Path(extra) / "model.onnx").is_file():
            raise ConfigError(f"--also {extra}: not an ONNX export directory (no model.onnx)")
    names = [Path(extra).name for extra in args.also]
    if len(set(names)) != len(names):
        raise ConfigError(f"--also directories need distinct names (their labels are ort:NAME), found {names}")
    model = _load(args)
    if args.n_prompt + args.n_decode + 1 > model.config.context_length:
        raise ConfigError(f"--n-prompt {args.n_prompt} + --n-decode {args.n_decode} exceed the model's context "
                          f"of {model.config.context_length}")
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as tmp:
        if "artifact" in model.metadata:
            art_dir = Path(model.source)
            gguf = Path(str(model.metadata["artifact"].get("model", {}).get("source", "")))
        else:
            gguf = Path(model.source)
        if args.vs == "llama.cpp" and not (gguf.is_file() and gguf.suffix.lower() == ".gguf"):
            raise ConfigError(f"--vs llama.cpp needs the model's GGUF file; {gguf or '(none recorded)'} is not one")
        if "artifact" not in model.metadata:
            art_dir = export_onnx(model, Path(tmp) / "onnx", _plan(args, model), progress=True)
        engines = [Engine.onnx_dir("edgellm-ort", "onnxruntime", art_dir)]
        engines += [Engine.onnx_dir(f"ort:{Path(extra).name}", "onnxruntime", Path(extra)) for extra in args.also]
        if args.genai:
            from edgellm.bench.genai import build_int4

            if not (gguf.is_file() and gguf.suffix.lower() == ".gguf"):
                raise ConfigError(f"--genai builds from the model's GGUF file; {gguf or '(none recorded)'} is not one")
            genai_dir = build_int4(gguf, config.threads, log=lambda s: print(s, file=sys.stderr))
            engines.append(Engine.onnx_dir("ort-genai-int4", GENAI_BACKEND, genai_dir))
        if args.vs == "llama.cpp":
            engines.append(Engine("llama.cpp", "llama.cpp", str(gguf), (gguf,)))
        tok = _tokenizer(load_model(art_dir))
        result = run_bench(engines, tok, config, ppl_fn=alice_perplexity(tok, config) if config.ppl_tokens else None,
                           log=lambda s: print(s, file=sys.stderr))
        add_ratios(result, "edgellm-ort", [e.label for e in engines[1:] if e.label.startswith(("ort:", "ort-genai"))])
    print(format_table(result))
    if args.json:
        print(f"wrote {write_result(result, args.json)}", file=sys.stderr)
    return 0


def compress(args: argparse.Namespace) -> int:
    from edgellm.compress.passes import CompressState
    from edgellm.compress.pipeline import run_recipe, write_compressed
    from edgellm.compress.plan import CompressionPlan
    from edgellm.compress.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # a bad recipe fails before the model loads
    model = _load(args)
    state = CompressState(model=model, plan=CompressionPlan(), seed=recipe.seed, progress=True,
                          cache_dir=Path(args.cache_dir) if args.cache_dir else _default_cache())
    if args.budget_mb is not None:
        from edgellm.compress.rtn import head_bytes, other_bytes

        fixed = other_bytes(model) + _container_bytes(model)
        state.budget_bytes = int(args.budget_mb * 2**20) - fixed
        heads = [f for s in recipe.passes if s.name == "allocate" for f in s.params.head_formats]
        smallest = fixed - max((head_bytes(model, "auto") - head_bytes(model, f) for f in heads), default=0)
        if int(args.budget_mb * 2**20) <= smallest:
            raise ConfigError(f"--budget-mb {args.budget_mb} does not even hold the embedding and lm_head "
                              f"({smallest / 2**20:.1f} MB)")
    if args.target is not None:
        _attach_target(state, args)
    elif args.budget_ms_per_token is not None:
        raise ConfigError("--budget-ms-per-token needs --target (its measured cost table gives the latencies)")
    run_recipe(state, recipe)
    if args.hardware_in_the_loop:
        _hardware_in_the_loop(state, recipe, args)
    out = write_compressed(state, recipe, args.output, overwrite=args.force)
    report = state.report.get("allocate")
    if report:
        print(f"plan: {report['format_counts']}  predicted KL {report['predicted_kl']:.4f}  "
              f"linear {report['linear_bytes'] / 2**20:.1f} MB, {report['linear_us'] / 1e3:.2f} ms/token")
    print(f"wrote {out} (export it with: edgellm export onnx {out} -o OUT)")
    return 0


def _default_cache() -> Path:
    import os

    return Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm") / "sensitivity"


def _container_bytes(model) -> int:
    """What a GGUF file holds besides tensor data (metadata, tokenizer, alignment): part of a file budget."""
    source = Path(model.source)
    tensors = list(model.weights.values())
    if source.suffix.lower() != ".gguf" or not source.is_file() or any(t.raw is None for t in tensors):
        return 0
    return max(0, source.stat().st_size - sum(t.nbytes for t in tensors))


def _attach_target(state, args) -> None:
    from edgellm.compress.plan import CompressionPlan
    from edgellm.compress.target import load_target

    target = load_target(args.target)
    table = target.load_cost_table()
    state.target = target
    state.cost_us = lambda unit, fmt: table.cost_us(unit.k, unit.n, "int4" if fmt == "auto" else fmt)
    state.plan = CompressionPlan(accuracy_level=target.accuracy_level,
                                 lm_head_accuracy_level=target.lm_head_accuracy_level)
    if args.budget_ms_per_token is not None:
        cfg = state.model.config
        if table.overhead_us is None:
            raise ConfigError(f"{target.cost_table} has no overhead_us; re-run: edgellm profile --target {target.name}")
        fixed = table.overhead_us + table.cost_us(cfg.hidden_size, cfg.vocab_size, "int8")
        state.budget_us = args.budget_ms_per_token * 1e3 - fixed
        if state.budget_us <= 0:
            raise ConfigError(f"--budget-ms-per-token {args.budget_ms_per_token} is below the fixed cost of "
                              f"{fixed / 1e3:.2f} ms/token on {args.target} (attention, norms, lm_head)")


def kernels(args: argparse.Namespace) -> int:
    from edgellm.runtime import ort_kernels

    library = ort_kernels.build()
    data = {"isa": library.isa, "library": str(library.path), "cache": str(ort_kernels.cache_dir()),
            "domain": ort_kernels.DOMAIN, "ops": ["BlockMatMul", "BlockGather"], "formats": sorted(ort_kernels.FORMATS)}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"edgellm kernels: {library.isa} path, {library.path}")
    return 0


def profile(args: argparse.Namespace) -> int:
    from edgellm.bench.layer_profile import profile_main

    return profile_main(args)


HIL_HEADROOM = 0.03  # run-to-run spread of one plan's decode ms/token on this 2-core VM: about +-3 % (measured)


def _hardware_in_the_loop(state, recipe, args) -> None:
    """Export the plan, time it on this machine, rescale the cost model by measured/predicted, re-solve.

    The scale is the median of measured / table-predicted over every plan timed so far, so one noisy
    measurement cannot swing the budget; each round reports the table's prediction and the corrected one.
    """
    import statistics
    import tempfile

    from edgellm.bench.decode_probe import decode_ms_per_token
    from edgellm.compress.pipeline import run_recipe
    from edgellm.export.onnx_export import export_onnx, lowering_for

    if args.budget_ms_per_token is None or getattr(state, "target", None) is None:
        raise ConfigError("--hardware-in-the-loop needs --target and --budget-ms-per-token")
    fixed_us = args.budget_ms_per_token * 1e3 - state.budget_us
    history: list[dict] = []
    scales: list[float] = []
    for round_ in range(args.hardware_in_the_loop):
        table_ms = (state.report["allocate"]["linear_us"] + fixed_us) / 1e3
        corrected_ms = table_ms * (statistics.median(scales) if scales else 1.0)
        with tempfile.TemporaryDirectory(prefix="edgellm-hil-") as tmp:
            # stock ops: the lowering the target's cost table timed (it has no BlockMatMul entries yet)
            art = export_onnx(state.model, Path(tmp) / "onnx", state.plan,
                              options=lowering_for(state.plan, "matmulnbits"))
            measured = decode_ms_per_token(art, threads=state.target.threads, rounds=5)
        scales.append(measured / table_ms)
        history.append({"round": round_ + 1, "predicted_ms": corrected_ms, "table_predicted_ms": table_ms,
                        "measured_ms": measured, "format_counts": state.report["allocate"]["format_counts"]})
        print(f"hardware in the loop {round_ + 1}: predicted {corrected_ms:.2f} ms/token (cost table {table_ms:.2f}), "
              f"measured {measured:.2f}", file=sys.stderr)
        if measured <= args.budget_ms_per_token:
            break
        if round_ == args.hardware_in_the_loop - 1:  # keep the plan that was measured; say it misses
            print(f"hardware in the loop: the plan measured {measured:.2f} ms/token, over the "
                  f"{args.budget_ms_per_token} budget after {args.hardware_in_the_loop} rounds", file=sys.stderr)
            break
        scale = statistics.median(scales)  # the cost table is optimistic by this factor on this machine now
        # aim HIL_HEADROOM under the budget: a plan predicted exactly at it misses half the time to timing noise
        state.budget_us = args.budget_ms_per_token * 1e3 * (1 - HIL_HEADROOM) / scale - fixed_us
        try:
            if state.budget_us <= 0:
                raise ConfigError("the corrected budget leaves nothing for the linear layers")
            run_recipe(state, recipe)
        except ConfigError as exc:
            raise ConfigError(f"measured {measured:.2f} ms/token against a budget of {args.budget_ms_per_token} "
                              f"and the corrected cost model admits no plan ({exc})") from None
    state.report["hardware_in_the_loop"] = history
