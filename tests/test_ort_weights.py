"""Weights lent to ONNX Runtime from edgellm's own memory (edgellm.runtime.ort_weights): same numbers, less RSS.

Oracle for the numbers: the same export loaded by ONNX Runtime itself (lend_weights=False); logits must
be bit-identical, since the kernels and the bytes are the same. Residency is read from the kernel
(/proc/self/maps + /proc/self/pagemap present bits, /proc/<pid>/status VmHWM), not from edgellm.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgellm.errors import ConfigError, ModelFormatError
from edgellm.model.loader import load_model
from edgellm.runtime.backend import LayerRange
from edgellm.runtime.onnxruntime_cpu import OrtBackend
from edgellm.runtime.ort_weights import SUPPORTED

pytestmark = pytest.mark.skipif(not SUPPORTED or not Path("/proc/self/pagemap").exists(),
                                reason="needs mmap.madvise and Linux /proc (lending is off elsewhere)")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _backend(directory: Path, **options) -> OrtBackend:
    return OrtBackend(load_model(directory).config, directory, threads=2, **options)


def _resident_bytes(path: Path) -> int:
    """Bytes of `path` mapped into this process and present in memory (all mappings of it)."""
    real = os.path.realpath(path)
    total = 0
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or parts[5] != real:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            pagemap.seek(start // PAGE * 8)
            raw = pagemap.read((end - start) // PAGE * 8)
            total += PAGE * sum(e >> 63 for e in struct.unpack(f"<{len(raw) // 8}Q", raw))
    return total


def _logits(backend: OrtBackend, ids: list[int]) -> np.ndarray:
    session = backend.open_session(max_tokens=len(ids) + 8)
    out = [session.forward(np.asarray(ids[:-4]), all_logits=True)]
    out += [session.forward(np.asarray([t])) for t in ids[-4:]]
    return np.concatenate(out)


def test_lent_weights_compute_exactly_what_ort_computes_from_its_own_loading(artifact, alice_ids):
    ids = alice_ids[:40]
    lent, own = _backend(artifact), _backend(artifact, lend_weights=False)
    assert lent.weights is not None and own.weights is None
    np.testing.assert_array_equal(_logits(lent, ids), _logits(own, ids))  # bit-identical: same kernels, same bytes


def test_a_layer_range_cut_gets_the_lent_weights_too(artifact, alice_ids):
    ids = np.asarray(alice_ids[:12])
    lent, own = _backend(artifact), _backend(artifact, lend_weights=False)
    outs = []
    for b in (lent, own):
        head = b.open_session(max_tokens=16, layers=LayerRange(0, 10, n_layers=b.config.n_layers))
        tail = b.open_session(max_tokens=16, layers=LayerRange(10, b.config.n_layers, n_layers=b.config.n_layers))
        outs.append(tail.forward(head.forward(ids), all_logits=True))
    np.testing.assert_array_equal(*outs)


def test_packed_weights_leave_the_resident_set(artifact, alice_ids):
    data = artifact / "model.onnx.data"
    size = data.stat().st_size
    before = _resident_bytes(data)
    lent = _backend(artifact)
    lent.open_session(max_tokens=64).forward(np.asarray(alice_ids[:48]))
    lent_resident = _resident_bytes(data) - before
    # what a forward reads from the file: norms and rope tables (grouped first in the file), a few MB at most
    assert lent_resident < 0.05 * size, f"{lent_resident / 2**20:.1f} MB of the weights file still resident"
    own = _backend(artifact, lend_weights=False)
    own.open_session(max_tokens=64).forward(np.asarray(alice_ids[:48]))
    own_resident = _resident_bytes(data) - before - lent_resident
    # the control: ONNX Runtime's own mapping keeps scales and embedding pages (tens of MB), so the probe sees pages
    assert own_resident > lent_resident + 10 * 2**20, (own_resident, lent_resident)


def test_embedding_rows_are_read_in_on_first_use_only(artifact, alice_ids):
    b = _backend(artifact)
    weights = b.weights
    table = weights.arrays["token_embd.q8"]
    assert not weights._filled.any() and not table.any()  # nothing read before the first forward
    ids = alice_ids[:30]
    b.open_session(max_tokens=40).forward(np.asarray(ids))
    assert set(np.flatnonzero(weights._filled).tolist()) == set(ids)
    info = json.loads((artifact / "manifest.json").read_text())["graph"]["initializers"]["token_embd.q8"]
    on_disk = np.fromfile(artifact / "model.onnx.data", dtype=np.uint8, count=info["length"],
                          offset=info["offset"]).view(table.dtype).reshape(table.shape)
    np.testing.assert_array_equal(table[ids], on_disk[ids])
    unread = np.setdiff1d(np.arange(len(table)), ids)[:1000]
    assert not table[unread].any()


def test_a_token_id_outside_the_vocabulary_is_a_clear_error(artifact):
    b = _backend(artifact)
    with pytest.raises(ConfigError, match=r"token ids must lie in \[0, 49152\), found 5..49152"):
        b.weights.ensure_rows(np.asarray([5, 49152]))


def _edit_table(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["graph"])
    path.write_text(json.dumps(manifest))


def test_a_table_entry_past_the_end_of_the_data_file_is_refused(copy):
    _edit_table(copy, lambda g: g["initializers"]["lm_head.qweight"].update(offset=10**10))
    with pytest.raises(ModelFormatError, match=r"tensor 'lm_head.qweight' .* lies past the end of the file .*"
                                               r"truncated or corrupt export"):
        _backend(copy)


def test_a_malformed_table_is_refused(copy):
    _edit_table(copy, lambda g: g.update(initializers=["not", "an", "object"]))
    with pytest.raises(ModelFormatError, match=r"graph\.initializers should be an object"):
        _backend(copy)
    _edit_table(copy, lambda g: g.update(initializers={"lm_head.qweight": {"offset": 0}}))
    with pytest.raises(ModelFormatError, match=r"graph\.initializers\['lm_head\.qweight'\] is malformed"):
        _backend(copy)


def test_an_export_without_the_table_loads_as_before(copy, artifact, alice_ids):
    _edit_table(copy, lambda g: (g.pop("initializers"), g.pop("token_rows")))
    old = _backend(copy)
    assert old.weights is None
    np.testing.assert_array_equal(_logits(old, alice_ids[:20]), _logits(_backend(artifact), alice_ids[:20]))


def test_the_table_matches_the_graph_and_runtime_read_weights_come_first(artifact):
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    table = json.loads((artifact / "manifest.json").read_text())["graph"]["initializers"]
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert (int(info.get("offset", 0)), int(info["length"]), list(t.dims)) == \
                (table[t.name]["offset"], table[t.name]["length"], table[t.name]["shape"])
    packed = {n.input[i] for n in graph.node if n.op_type == "MatMulNBits" for i in (1, 2, 3) if i < len(n.input)}
    packed |= {n.input[1] for n in graph.node if n.op_type == "Gemm"}
    packed |= {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"}
    read = [v["offset"] + v["length"] for k, v in table.items() if k not in packed]
    assert read and max(read) <= min(v["offset"] for k, v in table.items() if k in packed)


PEAK_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from edgellm.model.loader import load_model
from edgellm.runtime.onnxruntime_cpu import OrtBackend
d = Path(sys.argv[1])
b = OrtBackend(load_model(d).config, d, threads=2, lend_weights=sys.argv[2] == "1")
b.open_session(max_tokens=140).forward(np.arange(1000, 1128) * 37 % 49152)
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def test_lending_lowers_the_peak_rss_of_a_fresh_process(artifact):
    """The peak (VmHWM) of load + a 128-token prefill, in fresh processes: lent vs ONNX Runtime's own loading."""
    peaks = {}
    for lend in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(artifact), lend], capture_output=True, text=True,
                             check=True)
        peaks[lend] = int(out.stdout.split()[-1]) / 1024
    # measured here: ~222 vs ~265 MB; the creation transient (lm_head original) and embedding pages are gone
    assert peaks["1"] < peaks["0"] - 25, peaks
