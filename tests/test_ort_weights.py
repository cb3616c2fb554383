"""Weights lent to ONNX Runtime from edgellm's own memory (edgellm.runtime.ort_weights): same numbers, less RSS.

Most tests here use the stock-op export (--kernel matmulnbits), where ONNX Runtime packs the weights and the
lent pages must leave the resident set; the default export's BlockMatMul reads the lent bytes at run time.

Oracle for the numbers: the same export loaded by ONNX Runtime itself (lend_weights=False); logits must
be bit-identical, since the kernels and the bytes are the same. Residency is read from the kernel
(/proc/self/maps + /proc/self/pagemap present bits, /proc/<pid>/status VmHWM), not from edgellm.
"""

from __future__ import annotations

import gc
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
from edgellm.runtime.ort_weights import SUPPORTED, MappedWeights

pytestmark = pytest.mark.skipif(not SUPPORTED or not Path("/proc/self/pagemap").exists(),
                                reason="needs mmap.madvise and Linux /proc (lending is off elsewhere)")
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    """The lossless export in stock ONNX Runtime ops (MatMulNBits + offsets): the weights ORT packs."""
    from edgellm.export.onnx_export import export_onnx
    from edgellm.export.onnx_graph import LoweringOptions

    return export_onnx(model, tmp_path_factory.mktemp("stock") / "smollm2", options=LoweringOptions(block_kernel="matmulnbits"))


@pytest.fixture
def copy(artifact, tmp_path):
    import shutil

    return Path(shutil.copytree(artifact, tmp_path / "smollm2"))


def test_block_kernel_export_computes_the_same_from_lent_weights(model, tmp_path_factory, alice_ids):
    """The default export (BlockMatMul reads the lent GGUF bytes in place at run time): bit-identical."""
    from edgellm.export.onnx_export import export_onnx

    default = export_onnx(model, tmp_path_factory.mktemp("default") / "smollm2")
    lent, own = _backend(default), _backend(default, lend_weights=False)
    np.testing.assert_array_equal(_logits(lent, alice_ids[:24]), _logits(own, alice_ids[:24]))


def _backend(directory: Path, **options) -> OrtBackend:
    return OrtBackend(load_model(directory).config, directory, threads=2, **options)


def _present_pages(start: int, end: int) -> np.ndarray:
    """Indices of the pages in [start, end) of this process's memory that are resident (pagemap bit 63)."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(start // PAGE * 8)
        raw = pagemap.read((end - start) // PAGE * 8)
    return np.flatnonzero(np.array(struct.unpack(f"<{len(raw) // 8}Q", raw), dtype=np.uint64) >> np.uint64(63))


def _resident_bytes(path: Path) -> int:
    """Bytes of `path` mapped into this process and present in memory (all mappings of it)."""
    gc.collect()  # a backend freed between two readings must not leave its mapping in one of them
    real = os.path.realpath(path)
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                total += PAGE * len(_present_pages(start, end))
    return total


def _logits(backend: OrtBackend, ids: list[int]) -> np.ndarray:
    session = backend.open_session(max_tokens=len(ids) + 8)
    out = [session.forward(np.asarray(ids[:-4]), all_logits=True)]
    out += [session.forward(np.asarray([t])) for t in ids[-4:]]
    return np.concatenate(out)


@pytest.mark.parametrize("optimization", ["all", "none"])
def test_lent_weights_compute_exactly_what_ort_computes_from_its_own_loading(artifact, alice_ids, optimization):
    ids = alice_ids[:40]
    lent = _backend(artifact, optimization=optimization)
    own = _backend(artifact, lend_weights=False, optimization=optimization)
    assert lent.weights is not None and own.weights is None
    np.testing.assert_array_equal(_logits(lent, ids), _logits(own, ids))  # bit-identical: same kernels, same bytes


def test_a_layer_range_cut_gets_the_lent_weights_too(artifact, alice_ids, monkeypatch):
    lent_counts = []
    real_lend = MappedWeights.lend

    def counting_lend(self, options, initializer_names=None):
        lent_counts.append((initializer_names is not None, real_lend(self, options, initializer_names)))
        return lent_counts[-1][1]

    monkeypatch.setattr(MappedWeights, "lend", counting_lend)
    ids = np.asarray(alice_ids[:12])
    lent, own = _backend(artifact), _backend(artifact, lend_weights=False)
    outs = []
    for b in (lent, own):
        head = b.open_session(max_tokens=16, layers=LayerRange(0, 10, n_layers=b.config.n_layers))
        tail = b.open_session(max_tokens=16, layers=LayerRange(10, b.config.n_layers, n_layers=b.config.n_layers))
        outs.append(tail.forward(head.forward(ids), all_logits=True))
    np.testing.assert_array_equal(*outs)
    cuts = [n for is_cut, n in lent_counts if is_cut]
    assert len(cuts) == 2 and all(n > 30 for n in cuts), lent_counts  # each cut was lent its layers' weights


def test_without_madvise_the_backend_loads_as_before(artifact, alice_ids, monkeypatch):
    import edgellm.runtime.onnxruntime_cpu as ort_cpu

    monkeypatch.setattr(ort_cpu, "SUPPORTED", False)
    plain = _backend(artifact)
    assert plain.weights is None
    np.testing.assert_array_equal(_logits(plain, alice_ids[:12]), _logits(_backend(artifact), alice_ids[:12]))


def test_packed_weights_leave_the_resident_set(artifact, alice_ids):
    data = artifact / "model.onnx.data"
    size = data.stat().st_size
    before = _resident_bytes(data)
    lent = _backend(artifact)
    lent.open_session(max_tokens=64).forward(np.asarray(alice_ids[:48]))
    lent_resident = _resident_bytes(data) - before
    # what a forward reads from the file: norms and rope tables (grouped first in the file), a few MB at most
    assert lent_resident < 0.05 * size, f"{lent_resident / 2**20:.1f} MB of the weights file still resident"
    # ... and those pages lie at the front of the file, before the first int4 weight (plus one 2 MB folio)
    base = np.frombuffer(lent.weights._map, dtype=np.uint8).ctypes.data
    pages = _present_pages(base, base + size)
    table = json.loads((artifact / "manifest.json").read_text())["graph"]["initializers"]
    first_weight = min(v["offset"] for k, v in table.items() if k.endswith(".qweight"))
    assert len(pages) and pages.max() * PAGE < first_weight + 2 * 2**20, (pages.max() * PAGE, first_weight)
    own = _backend(artifact, lend_weights=False)
    own.open_session(max_tokens=64).forward(np.asarray(alice_ids[:48]))
    own_resident = _resident_bytes(data) - before - lent_resident
    # the control: ONNX Runtime's own mapping keeps scales and embedding pages (tens of MB), so the probe sees pages
    assert own_resident > lent_resident + 10 * 2**20, (own_resident, lent_resident)


def test_a_session_outlives_its_backend(artifact, alice_ids):
    """ONNX Runtime reads the lent arrays in place: a session kept after its backend is dropped still works."""
    backend = _backend(artifact)
    expected = backend.open_session(max_tokens=16).forward(np.asarray(alice_ids[:10]))
    kept = backend.open_session(max_tokens=16)
    del backend
    gc.collect()
    np.testing.assert_array_equal(kept.forward(np.asarray(alice_ids[:10])), expected)


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
    _edit_table(copy, lambda g: g.update(initializers={"lm_head.qweight": {"offset": 0}}, token_rows=[]))
    with pytest.raises(ModelFormatError, match=r"graph\.initializers\['lm_head\.qweight'\] is malformed"):
        _backend(copy)


@pytest.mark.parametrize("change, message", [
    ({"length": -4, "shape": [-4]}, r"non-negative integers"),
    ({"shape": [2**62, 4]}, r"does not fit its shape"),
    ({"offset": 1.7}, r"non-negative integers"),
    ({"shape": "44"}, r"non-negative integers"),
    ({"dtype": "object"}, r"dtype 'object' is not a native numeric type"),
    ({"dtype": ">f4"}, r"dtype '>f4' is not a native numeric type"),
    ({"dtype": "U1"}, r"dtype 'U1' is not a native numeric type"),
    ({"dtype": 7}, r"dtype 7 is not a native numeric type"),
])
def test_hostile_table_values_are_refused_by_name(copy, change, message):
    _edit_table(copy, lambda g: g["initializers"]["blk.0.attn_norm.weight"].update(change))
    with pytest.raises(ModelFormatError, match=rf"'blk\.0\.attn_norm\.weight'.*{message}"):
        _backend(copy)


@pytest.mark.parametrize("rows, message", [
    (["token_embd.q8", "no.such.tensor"], r"token_rows names tensors missing from graph\.initializers"),
    (["token_embd.q8", "token_embd.q8"], r"or names one twice"),
    (["blk.0.attn_norm.weight"], r"token-row table 'blk\.0\.attn_norm\.weight' has shape \[576\]"),
    (["token_embd.q8", "rope.cos"],
     r"token-row table '(rope\.cos|token_embd\.q8)' has shape .* the same number of rows"),
])
def test_bad_token_rows_are_refused(copy, rows, message):
    _edit_table(copy, lambda g: g.update(token_rows=rows))
    with pytest.raises(ModelFormatError, match=message):
        _backend(copy)


def test_a_data_file_that_is_a_directory_is_refused(copy):
    (copy / "model.onnx.data").rename(copy / "elsewhere")
    (copy / "model.onnx.data").mkdir()
    graph = json.loads((copy / "manifest.json").read_text())["graph"]  # (the checksum check would stop a load first)
    with pytest.raises(ModelFormatError, match=r"model\.onnx\.data: the external weight data is not a non-empty "
                                               r"regular file"):
        MappedWeights(copy, graph)


def test_an_export_without_the_table_loads_as_before(copy, artifact, alice_ids):
    _edit_table(copy, lambda g: (g.pop("initializers"), g.pop("token_rows")))
    old = _backend(copy)
    assert old.weights is None
    np.testing.assert_array_equal(_logits(old, alice_ids[:20]), _logits(_backend(artifact), alice_ids[:20]))


def test_the_table_matches_the_graph(artifact):
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    table = json.loads((artifact / "manifest.json").read_text())["graph"]["initializers"]
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert (int(info.get("offset", 0)), int(info["length"]), list(t.dims)) == \
                (table[t.name]["offset"], table[t.name]["length"], table[t.name]["shape"])


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
    # measured here: lent ~219-222 MB; ONNX Runtime's own loading 238-266 MB (how many embedding pages it keeps
    # depends on the page cache's folio sizes). The creation transient and the embedding pages are gone.
    assert peaks["1"] < peaks["0"] - 10, peaks
