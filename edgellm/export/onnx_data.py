"""The export's weight file: one external data file, each distinct tensor stored once, in the order that
keeps a runtime's resident set small.

Why not `onnx.save_model(save_as_external_data=True)`: it writes every initializer separately, so a tied
embedding and lm_head (SmolLM2: the same Q8_0 blocks and scales, gathered by one node and multiplied by
another) are stored twice, 32 MB of a 139 MB export; and it keeps graph order, which interleaves the
few tensors a forward reads with the weights ONNX Runtime packs at load (see `not_read_at_run_time`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

INLINE_BELOW = 1024  # bytes: smaller initializers stay inside model.onnx
PAGE_ALIGN_FROM = 1 << 20  # tensors this large start on a 4 KiB page (mmap-friendly), others on 64 bytes


def token_row_tables(model: Any) -> list[str]:
    """Initializers used only as `Gather(table, input_ids)`: a runtime may read them row by row on demand."""
    initializers = {t.name for t in model.graph.initializer}
    uses: dict[str, list[bool]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in initializers:
                uses.setdefault(name, []).append(n.op_type == "Gather" and i == 0 and n.input[1] == "input_ids")
    return sorted(name for name, by_token in uses.items() if all(by_token))


def not_read_at_run_time(model: Any) -> set[str]:
    """Initializers a forward does not read from the file: weights ONNX Runtime repacks when the session is
    created (MatMulNBits inputs, the constant B of Gemm/MatMul) and the token-row tables."""
    initializers = {t.name for t in model.graph.initializer}
    nodes = model.graph.node
    names = {n.input[i] for n in nodes if n.op_type == "MatMulNBits" for i in (1, 2, 3) if i < len(n.input)}
    names |= {n.input[1] for n in nodes if n.op_type in ("Gemm", "MatMul")}
    return (names & initializers) | set(token_row_tables(model))


def initializer_table(model: Any, data_file: str) -> dict[str, dict[str, Any]]:
    """For the manifest: where each external initializer lies in `data_file` (numeric numpy dtypes only; a
    runtime lends these to ONNX Runtime itself, anything else ONNX Runtime loads from the file)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    table: dict[str, dict[str, Any]] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(t.data_type))
        except (KeyError, TypeError, ValueError):
            continue
        if info.get("location") != data_file or dtype.kind not in "biuf" or not dtype.isnative:
            continue  # bfloat16, int4, ...: numpy has no faithful view of them
        table[t.name] = {"offset": int(info.get("offset", 0)), "length": int(info["length"]),
                         "dtype": dtype.name, "shape": list(t.dims)}
    return table


def save_model_with_data(model: Any, model_path: Path, data_file: str) -> dict[str, int]:
    """Write `model_path` and `data_file` beside it; returns {"tensors", "stored", "shared_bytes"}.

    The data file holds first the tensors a forward reads (norms, rope tables), then those packed at load:
    a runtime page fault maps a whole page-cache folio (up to 2 MB), so grouped, the folios a forward
    touches hold only what it reads. Tensors with identical bytes share one range of the file.
    """
    import onnx
    from onnx.external_data_helper import set_external_data

    later = not_read_at_run_time(model)
    big = [t for t in model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= INLINE_BELOW]
    big.sort(key=lambda t: t.name in later)  # stable: graph order within each group
    stored: dict[bytes, int] = {}
    shared = 0
    with open(model_path.parent / data_file, "wb") as fh:
        for t in big:
            raw = t.raw_data
            key = hashlib.sha256(raw).digest() + len(raw).to_bytes(8, "little")
            if key in stored:
                offset = stored[key]
                shared += len(raw)
            else:
                align = 4096 if len(raw) >= PAGE_ALIGN_FROM else 64
                offset = -(-fh.tell() // align) * align
                fh.write(b"\0" * (offset - fh.tell()))
                fh.write(raw)
                stored[key] = offset
            set_external_data(t, location=data_file, offset=offset, length=len(raw))  # needs raw_data still set
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(model_path))
    return {"tensors": len(big), "stored": len(stored), "shared_bytes": shared}
