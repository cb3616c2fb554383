"""A thin, typed wrapper around onnx.helper that names things uniquely and keeps initializers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgellm.errors import missing_extra

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("onnx", "ort") from exc

MS_DOMAIN = "com.microsoft"
EDGELLM_DOMAIN = "com.edgellm"  # edgellm's own kernels (edgellm.runtime.ort_kernels)


@dataclass
class GraphBuilder:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    _counter: int = 0

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def const(self, name: str, value: np.ndarray) -> str:
        """Register an initializer once; a second call with the same name reuses it."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           domain: str = "", outputs: list[str] | None = None, **attrs) -> list[str]:
        """Append a node; returns its output names (fresh unless given)."""
        base = name or self.fresh(op_type.lower())
        outs = outputs or ([base] if n_out == 1 else [f"{base}/out{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, **kw)[0]

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, opset: int, ms_opset: int = 1) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  initializer=list(self.initializers.values()))
        imports = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, ms_opset)]
        if any(n.domain == EDGELLM_DOMAIN for n in self.nodes):
            imports.append(helper.make_opsetid(EDGELLM_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=imports, producer_name="edgellm")
        model.ir_version = 10
        return model


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
