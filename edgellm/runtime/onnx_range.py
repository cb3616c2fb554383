"""Cut a contiguous range of layers out of an exported whole-model graph, in memory.

The offloader and hybrid targets run layers [start, stop) on one engine and the rest elsewhere. Rather
than exporting one graph per possible split, the runtime cuts the exported graph: nodes are owned by a
layer through the exporter's naming convention (`blk.{i}.` prefixes; `embed/` before layer 0; everything
else after the last layer), and the cut graph keeps the artifact's external data file, so no weight is
copied on disk.

Boundaries (the residual stream is the only state that crosses a layer boundary; it crosses as
(batch, sequence, hidden), while inside the graph it is 2-D token rows, see onnx_graph):

    start > 0:  hidden_states ─► Reshape(rows) ─► SkipSimplifiedLayerNorm(skip = rows * 0) ─► attn_norm output
                     └─► Shape ─► seq_shape           └─► sum (= hidden rows): the residual stream of layer start
    stop < n:   ffn output of layer stop-1 ─► Add ◄─ residual ─► Reshape(seq_shape) ─► hidden_out   (the sum
                                                                              the next fused skip-norm would form)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgellm.errors import ConfigError, ModelFormatError, missing_extra
from edgellm.export.onnx_graph import SEQ_SHAPE

try:
    import onnx
    from onnx import TensorProto, helper
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("onnx", "ort") from exc

_LAYER = re.compile(r"^blk\.(\d+)\.")
MS_DOMAIN = "com.microsoft"
HIDDEN_ROWS = "range/hidden_rows"


@dataclass(frozen=True)
class RangeSignature:
    """What the cut graph takes and gives, for the session that binds it."""

    start: int
    stop: int
    n_layers: int

    @property
    def input_name(self) -> str:
        return "input_ids" if self.start == 0 else "hidden_states"

    @property
    def output_name(self) -> str:
        return "logits" if self.stop == self.n_layers else "hidden_out"


def _owner(name: str, n_layers: int) -> int:
    """Layer index owning a node; -1 for the embedding, n_layers for the final norm and head."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1))
    return -1 if name == "embed" or name.startswith("embed/") else n_layers  # "embed": a float Gather


def cut_layers(model: onnx.ModelProto, start: int, stop: int, n_layers: int, hidden: int) -> onnx.ModelProto:
    """A graph computing layers [start, stop) of `model` (loaded without its external data)."""
    if not 0 <= start < stop <= n_layers:
        raise ConfigError(f"cannot cut layers [{start}, {stop}) out of a {n_layers}-layer graph")
    g = model.graph
    by_name = {n.name: n for n in g.node}
    for needed in ([f"blk.{start}.attn_norm"] if start > 0 else []) + ([f"blk.{stop}.attn_norm"] if stop < n_layers else []):
        if needed not in by_name:
            raise ModelFormatError(f"the exported graph has no node {needed!r}; re-export it with this edgellm version")
    if not any(SEQ_SHAPE in n.output for n in g.node):  # exports before the 2-D token rows (2026-11-27)
        raise ModelFormatError("the exported graph predates layer-range cuts of 2-D token rows (no seq_shape); "
                               "re-export it with this edgellm version")
    lo = -1 if start == 0 else start
    hi = n_layers if stop == n_layers else stop - 1
    nodes = _entry_rows(hidden) if start > 0 else []
    for node in g.node:
        if not lo <= _owner(node.name, n_layers) <= hi:
            continue
        if start > 0 and node.name == f"blk.{start}.attn_norm":
            nodes.extend(_entry_norm(node))
            continue
        nodes.append(node)
    if stop < n_layers:
        boundary = by_name[f"blk.{stop}.attn_norm"]
        nodes.append(helper.make_node("Add", [boundary.input[0], boundary.input[1]], ["range/out_rows"], name="range/out_rows"))
        nodes.append(helper.make_node("Reshape", ["range/out_rows", SEQ_SHAPE], ["hidden_out"], name="range/hidden_out"))

    used = {i for n in nodes for i in n.input if i}
    produced = {o for n in nodes for o in n.output if o}
    inputs = [vi for vi in g.input if vi.name in used]
    if start > 0:
        inputs.insert(0, helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "sequence", hidden]))
    outputs = [vi for vi in g.output if vi.name in produced]
    if stop < n_layers:
        outputs.insert(0, helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["batch", "sequence", hidden]))
    initializers = [t for t in g.initializer if t.name in used and not t.name.startswith("range/")]
    if start > 0:
        initializers.append(helper.make_tensor("range/zero", TensorProto.FLOAT, [], [0.0]))
        initializers.append(helper.make_tensor("range/rows", TensorProto.INT64, [2], [-1, hidden]))
        initializers.append(helper.make_tensor("range/minus_one", TensorProto.INT64, [1], [-1]))
    graph = helper.make_graph(nodes, f"{g.name}_layers_{start}_{stop}", inputs, outputs, initializers)
    cut = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return cut


def _entry_rows(hidden: int) -> list[onnx.NodeProto]:
    """hidden_states (batch, sequence, hidden) as the graph's 2-D rows, and the seq_shape attention needs."""
    return [
        helper.make_node("Reshape", ["hidden_states", "range/rows"], [HIDDEN_ROWS], name="range/hidden_rows"),
        helper.make_node("Shape", ["hidden_states"], ["range/dims"], name="range/shape", end=2),
        helper.make_node("Concat", ["range/dims", "range/minus_one"], [SEQ_SHAPE], name="range/seq_shape", axis=0),
    ]


def _entry_norm(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The first layer's fused skip-norm, rewritten to start from a given residual stream."""
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    if node.op_type == "RMSNormalization":
        return [helper.make_node("RMSNormalization", [HIDDEN_ROWS, node.input[1]], [node.output[0]],
                                 name=node.name, axis=-1, epsilon=eps, stash_type=1)]
    if node.op_type != "SkipSimplifiedLayerNormalization" or len(node.output) < 4 or not node.output[3]:
        raise ModelFormatError(f"node {node.name!r} is a {node.op_type}, not the skip-norm a layer starts with")
    # The same fused kernel on (hidden, 0) as the whole graph runs on (x, residual): its sum is hidden + 0
    # = x + residual to the bit, so the cut reproduces the whole graph exactly, int8 activations included.
    zeros = helper.make_node("Mul", [HIDDEN_ROWS, "range/zero"], ["range/zeros"], name=f"{node.name}/zeros")
    fused = helper.make_node("SkipSimplifiedLayerNormalization", [HIDDEN_ROWS, "range/zeros", node.input[2]],
                             list(node.output), name=node.name, domain=MS_DOMAIN, epsilon=eps)
    return [zeros, fused]
