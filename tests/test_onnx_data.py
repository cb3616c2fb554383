"""The export's data file writer (edgellm.export.onnx_data): what onnx's own loader reads back is what was
written, identical tensors share one range, and runtime-read tensors come before packed ones."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellm.export.onnx_data import INLINE_BELOW, save_model_with_data


def _model(arrays: dict[str, np.ndarray], nodes: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return helper.make_model(graph)


def test_onnx_reads_back_every_tensor_and_identical_ones_share_a_range(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.integers(0, 255, size=(300, 64), dtype=np.uint8)
    arrays = {"norm": rng.standard_normal(700).astype(np.float32),  # read at run time
              "emb": table, "head": table.copy(),  # same bytes, two names (a tied embedding and lm_head)
              "other": rng.integers(0, 255, size=(300, 64), dtype=np.uint8),
              "tiny": np.arange(4, dtype=np.float32)}  # below the threshold: stays inline
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("MatMulNBits", ["x", "head", "s"], ["h"], domain="com.microsoft"),
             helper.make_node("Gemm", ["x", "other"], ["o"])]
    stats = save_model_with_data(_model(arrays, nodes), tmp_path / "m.onnx", "m.data")
    assert stats == {"tensors": 4, "stored": 3, "shared_bytes": table.nbytes}
    loaded = onnx.load(str(tmp_path / "m.onnx"))  # onnx's own reader of external data: the oracle
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), arrays[t.name])
    meta = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer
    where = {t.name: {e.key: e.value for e in t.external_data} for t in meta}
    assert where["emb"]["offset"] == where["head"]["offset"]
    assert int(where["norm"]["offset"]) < int(where["emb"]["offset"]) < int(where["other"]["offset"])
    assert all(int(w.get("offset", 0)) % 64 == 0 for w in where.values() if w)
    assert not where["tiny"] and len(arrays["tiny"].tobytes()) < INLINE_BELOW
    assert (tmp_path / "m.data").stat().st_size < sum(a.nbytes for a in arrays.values()) - table.nbytes + 64 * 4


def test_the_default_export_stores_the_tied_embedding_once(artifact):
    info = json.loads((artifact / "manifest.json").read_text())["graph"]["initializers"]
    assert info["token_embd.q8_0_x8"]["offset"] == info["lm_head.q8_0_x8"]["offset"]  # BlockGather | BlockMatMul
    ranges = {(v["offset"], v["length"]) for v in info.values()}
    assert (artifact / "model.onnx.data").stat().st_size >= sum(length for _, length in ranges)
    assert (artifact / "model.onnx.data").stat().st_size < sum(v["length"] for v in info.values()) - 28 * 2**20  # the 28.7 MiB Q8_0 table
