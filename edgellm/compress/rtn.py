"""Group-wise round-to-nearest for every plan format, including those no ONNX Runtime kernel runs.

The ONNX exporter quantizes by name only the formats MatMulNBits runs with blocks of 32. Every other
plan format (3 bits, groups of 64/128) goes through `materialize`: each linear is quantized into stored
blocks (qtype "BLOCKQ", as a GPTQ pass writes them) and the plan keeps those blocks ("auto"). The
reference backend then computes with exactly the dequantized blocks, and the exporter writes the 2/4/8-bit
ones as they are; 3-bit blocks are refused (`check_onnx_exportable`) because ONNX Runtime 1.32's
MatMulNBits accepts only 2, 4 and 8 bits.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgellm.compress.plan import ORT_MATMULNBITS_BITS, QUANT_FORMATS, RTN_FORMATS, CompressionPlan
from edgellm.errors import ConfigError
from edgellm.model.description import ModelDescription
from edgellm.model.tensor_names import LINEAR_ROLES
from edgellm.model.weights import ModelWeights, WeightTensor


def dequantized_weight(tensor: WeightTensor, fmt: str) -> np.ndarray:
    """float32 (N, K): the weights a linear computes with when stored in plan format `fmt`."""
    if fmt in QUANT_FORMATS and fmt not in RTN_FORMATS:
        from edgellm.export.block_formats import quantize_format

        return quantize_format(tensor.to_float(), fmt).dequantize()
    from edgellm.export.onnx_export import prepare_weight  # the exporter's own numerics for its formats

    weight, _ = prepare_weight(tensor, fmt)
    return weight if isinstance(weight, np.ndarray) else weight.dequantize()


def linear_names(description: ModelDescription) -> list[str]:
    return [f"blk.{i}.{role}" for i in range(description.config.n_layers) for role in LINEAR_ROLES]


def materialize(description: ModelDescription, plan: CompressionPlan) -> tuple[ModelDescription, CompressionPlan]:
    """A copy of the model whose round-to-nearest linears are stored blocks, and the plan that keeps them.

    Formats the exporter handles by name and "auto"/"fp32" layers are left to the exporter; the others
    (3 bits, groups of 64 or 128) are quantized here. The embedding and lm_head are untouched.
    """
    from edgellm.export.block_formats import quantize_format

    tensors = dict(description.weights.items())
    overrides: dict[str, str] = {}
    for name in linear_names(description):
        fmt = plan.format_for(name)
        if fmt in QUANT_FORMATS and fmt not in RTN_FORMATS:
            blocks = quantize_format(description.weights.float(f"{name}.weight"), fmt)
            description.weights[f"{name}.weight"].release_float()
            blocks.source = f"{fmt} RTN"
            tensors[f"{name}.weight"] = WeightTensor.from_blocks(f"{name}.weight", blocks)
            fmt = "auto"
        overrides[name] = fmt
    weights = ModelWeights(tensors, source=f"{description.weights.source} ({plan.name})")
    out = ModelDescription(config=description.config, weights=weights, tokenizer=description.tokenizer,
                           source=description.source, file_type=description.file_type,
                           metadata=dict(description.metadata))
    return out, replace(plan, default="auto", overrides=overrides)


def non_onnx_layers(description: ModelDescription, plan: CompressionPlan) -> dict[str, str]:
    """{linear: storage} of the layers ONNX Runtime's MatMulNBits cannot run (3-bit formats or blocks)."""
    bad = {}
    for name in linear_names(description):
        fmt = plan.format_for(name)
        tensor = description.weights[f"{name}.weight"]
        if fmt in QUANT_FORMATS and not QUANT_FORMATS[fmt].onnx_runnable:
            bad[name] = fmt
        elif fmt == "auto" and tensor.qtype == "BLOCKQ" and tensor.blocks.bits not in ORT_MATMULNBITS_BITS:
            bad[name] = f"{tensor.blocks.bits}-bit blocks ({tensor.blocks.source})"
    return bad


def check_onnx_exportable(description: ModelDescription, plan: CompressionPlan) -> None:
    """Raise ConfigError naming every layer ONNX Runtime cannot run under this plan."""
    bad = non_onnx_layers(description, plan)
    if bad:
        shown = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise ConfigError(
            f"plan {plan.name}: {len(bad)} linear layer(s) cannot be exported to ONNX: {shown}{more}; ONNX "
            f"Runtime's MatMulNBits runs only {', '.join(map(str, ORT_MATMULNBITS_BITS))}-bit weights. Evaluate "
            "the plan with the reference backend, or choose 2/4/8-bit formats for these layers")


def linear_bytes(description: ModelDescription, plan: CompressionPlan) -> tuple[int, int]:
    """(bytes, weights) of the linear layers as this plan stores them: codes + fp16 scales/minima, the
    GGUF convention (the ONNX export widens scales to fp32; its size is measured separately)."""
    from edgellm.export.block_formats import LOSSLESS_TRANSCODERS

    total = count = 0
    for name in linear_names(description):
        tensor = description.weights[f"{name}.weight"]
        n, k = tensor.shape
        fmt = plan.format_for(name)
        count += n * k
        if fmt in QUANT_FORMATS:
            total += QUANT_FORMATS[fmt].nbytes(k, n)
        elif fmt == "auto" and (tensor.qtype == "BLOCKQ" or tensor.qtype in LOSSLESS_TRANSCODERS):
            total += stored_bytes(tensor)  # a pass's blocks, or the GGUF's own
        else:  # fp32, or "auto" for a source without a lossless block form
            total += 4 * n * k
    if count == 0:
        raise ConfigError("the model has no linear layers")
    return total, count


def stored_bytes(tensor: WeightTensor) -> int:
    """Bytes of one tensor as a file holds it: a pass's blocks with fp16 scales, else the source's own."""
    return tensor.blocks.stored_nbytes if tensor.qtype == "BLOCKQ" else tensor.nbytes


def other_bytes(description: ModelDescription) -> int:
    """Bytes of every tensor that is not a decoder linear (embedding/lm_head, norms) as the model stores
    them: what a size budget holds besides the linears the allocator chooses."""
    linear = {f"{name}.weight" for name in linear_names(description)}
    return sum(stored_bytes(t) for name, t in description.weights.items() if name not in linear)


def head_bytes(description: ModelDescription, fmt: str) -> int:
    """Stored bytes of the lm_head tensor (with tied embeddings: the one shared tensor) in format `fmt`
    ("auto": as the model holds it now)."""
    tensor = description.weights[description.lm_head_name()]
    n, k = tensor.shape
    if fmt == "auto":
        return stored_bytes(tensor)
    if fmt == "fp32":
        return 4 * n * k
    if fmt not in QUANT_FORMATS:
        raise ConfigError(f"lm_head format {fmt!r} is not a block format; valid: auto, fp32, {', '.join(QUANT_FORMATS)}")
    return QUANT_FORMATS[fmt].nbytes(k, n)


def quantize_head(description: ModelDescription, fmt: str) -> None:
    """Store the lm_head in `fmt` (in place). With tied embeddings this is the token embedding too: one
    tensor in the file, so both the gather and the output projection use the quantized values."""
    from edgellm.export.block_formats import quantize_format

    name = description.lm_head_name()
    if fmt == "auto":
        return
    if fmt not in QUANT_FORMATS:
        raise ConfigError(f"lm_head format {fmt!r} is not a block format; valid: auto, {', '.join(QUANT_FORMATS)}")
    blocks = quantize_format(description.weights.float(name), fmt)
    blocks.source = f"{fmt} RTN"
    description.weights.replace(name, WeightTensor.from_blocks(name, blocks))
