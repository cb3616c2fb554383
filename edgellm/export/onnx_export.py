"""`edgellm export onnx`: model description + plan -> a directory ONNX Runtime runs.

Written into a temporary sibling directory and renamed into place only when complete (manifest last),
so an interrupted export never leaves a directory that loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgellm import __version__
from edgellm.compress.plan import RTN_FORMATS, CompressionPlan
from edgellm.errors import ConfigError
from edgellm.export.block_formats import LOSSLESS_TRANSCODERS, BlockQuantized, quantize_rtn, with_gguf_blocks
from edgellm.export.onnx_builder import MS_DOMAIN
from edgellm.export.onnx_data import initializer_table, save_model_with_data, token_row_tables
from edgellm.export.onnx_graph import OPSET, LoweringOptions, Weight, build_llama_graph, uses_block_kernel
from edgellm.model.artifact import ARTIFACT_FORMAT, MANIFEST, TOKENIZER_SPEC, sha256_file, tokenizer_to_dict
from edgellm.model.description import ModelDescription
from edgellm.model.rope import inverse_frequencies
from edgellm.model.tensor_names import LINEAR_ROLES
from edgellm.model.weights import WeightTensor

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def prepare_weight(tensor: WeightTensor, fmt: str) -> tuple[Weight, str]:
    """Storage for one linear layer under a plan format; returns (weight, description)."""
    if fmt == "auto":
        if tensor.qtype == "BLOCKQ":  # already in the exporter's format (e.g. GPTQ): kept as is
            return tensor.blocks, tensor.blocks.source
        if tensor.qtype in LOSSLESS_TRANSCODERS:
            bq = LOSSLESS_TRANSCODERS[tensor.qtype](tensor)
            return bq, bq.source
        fmt = "fp32"
    values = tensor.to_float()
    if fmt == "fp32":
        return np.ascontiguousarray(values, dtype=np.float32), f"fp32 from {tensor.qtype}"
    if fmt not in RTN_FORMATS:
        raise ConfigError(f"unknown format {fmt!r} for {tensor.name}; valid: fp32, auto, {', '.join(RTN_FORMATS)}")
    bits, symmetric = RTN_FORMATS[fmt]
    bq = quantize_rtn(values, bits, symmetric=symmetric)
    return bq, f"{bq.source} from {tensor.qtype}"


def _with_blocks(weight: Weight) -> Weight:
    return with_gguf_blocks(weight) if isinstance(weight, BlockQuantized) else weight


def lower(description: ModelDescription, plan: CompressionPlan, options: LoweringOptions, progress: bool = False):
    """Build the ONNX model in memory; returns (onnx model, per-layer format table)."""
    cfg, w = description.config, description.weights
    layers: dict[str, str] = {}
    linears: dict[str, Weight] = {}
    names = [f"blk.{i}.{role}" for i in range(cfg.n_layers) for role in LINEAR_ROLES]
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="transcode weights", unit="layer")
    for name in iterator:
        linears[name], layers[name] = prepare_weight(w[f"{name}.weight"], plan.format_for(name))
        w[f"{name}.weight"].release_float()
    norms = {f"blk.{i}.{n}": w.float(f"blk.{i}.{n}.weight") for i in range(cfg.n_layers)
             for n in ("attn_norm", "ffn_norm")}
    norms["output_norm"] = w.float("output_norm.weight")
    head_tensor = w[description.lm_head_name()]
    lm_head, layers["lm_head"] = prepare_weight(head_tensor, plan.lm_head)
    embed_tensor = w["token_embd.weight"]
    embed: Weight
    if embed_tensor.qtype == "BLOCKQ":  # a pass quantized it (a tied lm_head's format): gathered from blocks
        embed = embed_tensor.blocks
        layers["token_embd"] = f"{embed_tensor.blocks.source} (gather)"
    elif embed_tensor.qtype == "Q8_0":  # gathered straight from the (shared) Q8_0 blocks: lossless
        embed = lm_head if (cfg.tie_embeddings and isinstance(lm_head, BlockQuantized) and lm_head.bits == 8
                            and lm_head.source.startswith("Q8_0")) else LOSSLESS_TRANSCODERS["Q8_0"](embed_tensor)
        layers["token_embd"] = "Q8_0 transcode (gather)"
    else:
        embed = embed_tensor.to_float()
        layers["token_embd"] = f"fp32 from {embed_tensor.qtype}"
    if options.block_kernel == "edgellm":  # compressed blocks that are exactly a GGUF type run BlockMatMul too
        linears = {name: _with_blocks(weight) for name, weight in linears.items()}
        tied = embed is lm_head
        lm_head = _with_blocks(lm_head)
        embed = lm_head if tied else _with_blocks(embed)
    model = build_llama_graph(cfg, norms, linears, embed, lm_head, inverse_frequencies(description), options)
    for name, weight in [*linears.items(), ("lm_head", lm_head)]:
        level = options.lm_head_accuracy_level if name == "lm_head" else options.accuracy_level
        if uses_block_kernel(weight, options, level):
            layers[name] += " · edgellm BlockMatMul"
    if uses_block_kernel(embed, options, options.lm_head_accuracy_level):
        layers["token_embd"] += " · edgellm BlockGather"
    return model, layers


def lowering_for(plan: CompressionPlan, block_kernel: str = "edgellm") -> LoweringOptions:
    """The graph lowering of a plan: its accuracy levels, and which kernels take GGUF blocks."""
    return LoweringOptions(accuracy_level=plan.accuracy_level, lm_head_accuracy_level=plan.lm_head_accuracy_level,
                           block_kernel=block_kernel)


def export_onnx(description: ModelDescription, out_dir: str | Path, plan: CompressionPlan | None = None,
                overwrite: bool = False, progress: bool = False, options: LoweringOptions | None = None) -> Path:
    """Write the artifact directory atomically and return its path.

    options: graph lowering choices; default: the plan's accuracy levels and the exact offset path."""
    import onnx

    plan = plan or CompressionPlan()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=True (CLI: --force) to replace it")
    if description.tokenizer is None:
        raise ConfigError(f"{description.source}: the model has no tokenizer to ship with the export")
    started = time.time()
    levels = (plan.accuracy_level, plan.lm_head_accuracy_level)
    options = options or LoweringOptions(accuracy_level=levels[0], lm_head_accuracy_level=levels[1])
    if (options.accuracy_level, options.lm_head_accuracy_level) != levels:
        raise ConfigError(f"lowering accuracy levels {options.accuracy_level}/{options.lm_head_accuracy_level} "
                          f"disagree with plan {plan.name!r} ({levels[0]}/{levels[1]}); set them in one place")
    model, layers = lower(description, plan, options, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        written = save_model_with_data(model, tmp / MODEL_FILE, DATA_FILE)
        if written["shared_bytes"]:
            log.info("%d tensors stored as %d ranges (%.1f MB shared, e.g. a tied embedding and lm_head)",
                     written["tensors"], written["stored"], written["shared_bytes"] / 2**20)
        # where each weight lies in the data file: the runtime lends them to ONNX Runtime without parsing the graph
        table = initializer_table(model, DATA_FILE)
        graph = {"model": MODEL_FILE, "external_data": DATA_FILE, "initializers": table,
                 "token_rows": [name for name in token_row_tables(model) if name in table],
                 # op domains beyond ONNX Runtime's own: the runtime registers their kernels first
                 "custom_domains": sorted({n.domain for n in model.graph.node} - {"", "ai.onnx", MS_DOMAIN})}
        del model
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        _write_tokenizer(description, tmp)
        _write_manifest(description, plan, layers, tmp, time.time() - started, options, graph)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer(description: ModelDescription, directory: Path) -> None:
    from edgellm.model.tokenizer import Tokenizer

    spec = description.tokenizer
    (directory / TOKENIZER_SPEC).write_text(json.dumps(tokenizer_to_dict(spec)))
    # A standard tokenizer.json too, for runtimes outside edgellm (browser, Android).
    (directory / "tokenizer.json").write_text(Tokenizer(spec).hf_tokenizer().to_str())


def _write_manifest(description: ModelDescription, plan: CompressionPlan, layers: dict[str, str],
                    directory: Path, seconds: float, options: LoweringOptions, graph: dict) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = {
        "format": ARTIFACT_FORMAT,
        "format_version": 1,
        "backend": "onnxruntime",
        "edgellm_version": __version__,
        "model": {"name": description.config.name, "source": str(Path(description.source).resolve()),
                  "source_type": description.file_type},
        "config": description.config.to_dict(),
        "file_type": description.file_type,
        "opset": OPSET,
        "plan": plan.to_dict(),
        "layers": layers,
        "lowering": dataclasses.asdict(options),
        "graph": graph,
        "files": files,
        "export_seconds": round(seconds, 2),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap the finished directory into place; if the swap fails, the old export is put back."""
    if not out.exists():
        tmp.rename(out)
        return
    trash = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)  # a leftover from an earlier crash
    out.rename(trash)
    try:
        tmp.rename(out)
    except BaseException:
        trash.rename(out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def effective_description(description: ModelDescription, plan: CompressionPlan) -> ModelDescription:
    """The same model with every linear replaced by the float weights the export computes with.

    The reference backend run on this description is the oracle for an exported plan: any difference
    left is the runtime's arithmetic, not the weights.
    """
    from edgellm.model.weights import ModelWeights

    cfg, w = description.config, description.weights
    tensors = dict(w.items())
    for i in range(cfg.n_layers):
        for role in LINEAR_ROLES:
            name = f"blk.{i}.{role}"
            weight, _ = prepare_weight(w[f"{name}.weight"], plan.format_for(name))
            values = weight if isinstance(weight, np.ndarray) else weight.dequantize()
            tensors[f"{name}.weight"] = WeightTensor.from_array(f"{name}.weight", values)
    head, _ = prepare_weight(w[description.lm_head_name()], plan.lm_head)
    head_values = head if isinstance(head, np.ndarray) else head.dequantize()
    # The export keeps the embedding lossless even when the lm_head is requantized: untie them here.
    tensors["output.weight"] = WeightTensor.from_array("output.weight", head_values)
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
    return ModelDescription(config=cfg, weights=ModelWeights(tensors, source=f"{w.source} ({plan.name})"),
                            tokenizer=description.tokenizer, source=description.source,
                            file_type=description.file_type, metadata=dict(description.metadata))
