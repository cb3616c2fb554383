"""Long forwards on the ONNX Runtime backend run in chunks of `prefill_chunk` positions: same numbers, less memory.

Oracle: the same export run with prefill_chunk=0 (one ONNX Runtime call per forward). MLAS quantizes each
activation row on its own and attention treats each query row alone, so the results agree to float
rounding (measured: bit-identical); the tolerance below is fp32 rounding of logits of magnitude ~20.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgellm.errors import ConfigError
from edgellm.model.loader import load_model
from edgellm.runtime.backend import LayerRange
from edgellm.runtime.onnxruntime_cpu import OrtBackend


def _backend(directory: Path, chunk: int) -> OrtBackend:
    return OrtBackend(load_model(directory).config, directory, threads=2, prefill_chunk=chunk)


@pytest.fixture(scope="module")
def ids(alice_ids) -> np.ndarray:
    return np.asarray(alice_ids[:300])


@pytest.mark.parametrize("chunk", [64, 128])
def test_chunked_prefill_gives_the_same_logits(artifact, ids, chunk):
    whole, chunked = _backend(artifact, 0), _backend(artifact, chunk)
    for all_logits in (True, False):
        expected = whole.open_session(max_tokens=310).forward(ids, all_logits=all_logits)
        got = chunked.open_session(max_tokens=310).forward(ids, all_logits=all_logits)
        assert got.shape == expected.shape == ((len(ids) if all_logits else 1), whole.config.vocab_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    session = chunked.open_session(max_tokens=310)  # decoding after a chunked prefill continues the same cache
    session.forward(ids[:-1])
    ref = whole.open_session(max_tokens=310)
    ref.forward(ids[:-1])
    np.testing.assert_allclose(session.forward(ids[-1:]), ref.forward(ids[-1:]), rtol=0, atol=1e-4)


def test_a_layer_range_returning_hidden_states_is_chunked_too(artifact, ids):
    outs = []
    for chunk in (0, 64):
        b = _backend(artifact, chunk)
        head = b.open_session(max_tokens=310, layers=LayerRange(0, 12, n_layers=b.config.n_layers))
        outs.append(head.forward(ids))
    assert outs[0].shape == (len(ids), outs[0].shape[1])
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("bad", [-1, 2.5, "64"])
def test_a_bad_chunk_size_is_refused(artifact, bad):
    with pytest.raises(ConfigError, match=r"prefill_chunk must be a non-negative integer"):
        _backend(artifact, bad)


PEAK_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from edgellm.model.loader import load_model
from edgellm.runtime.onnxruntime_cpu import OrtBackend
d = Path(sys.argv[1])
b = OrtBackend(load_model(d).config, d, threads=2, prefill_chunk=int(sys.argv[2]))
b.open_session(max_tokens=1030).forward((np.arange(1024) * 7919 % 40000 + 100).astype(np.int64))
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_chunks_bound_the_memory_of_a_long_prompt(artifact):
    """Peak RSS of a fresh process prefilling 1024 tokens (measured here: ~254 MB in chunks of 128, ~291 whole)."""
    peaks = {chunk: int(subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(artifact), str(chunk)],
                                       capture_output=True, text=True, check=True).stdout.split()[-1]) / 1024
             for chunk in (0, 128)}
    assert peaks[128] < peaks[0] - 20, peaks
