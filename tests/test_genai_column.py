"""`edgellm bench --genai`: ONNX Runtime GenAI's own int4 build of the same GGUF as a comparison column,
timed and scored by the same bench (its symmetric requantization loses perplexity; ours does not)."""

from __future__ import annotations

import json

import onnxruntime_genai  # noqa: F401  (the bench extra; scripts/setup.sh dev installs it: fail, never skip)
import pytest

from tests.test_cli import edgellm


@pytest.mark.slow
@pytest.mark.llamacpp
def test_bench_adds_a_genai_column_built_from_the_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_GENAI_CACHE", str(tmp_path / "genai"))
    out = tmp_path / "bench.json"
    edgellm("bench", "--vs", "llama.cpp", "--genai", "--rounds", "1", "--reps", "1", "--n-prompt", "16",
            "--n-decode", "8", "--ppl-tokens", "600", "--json", str(out))
    result = json.loads(out.read_text())
    assert list(result["engines"]) == ["edgellm-ort", "ort-genai-int4", "llama.cpp"]  # llama.cpp stays the baseline
    genai = result["engines"]["ort-genai-int4"]
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "file_mb", "ppl"):
        assert genai[key] > 0, key
    built = list((tmp_path / "genai").iterdir())
    assert len(built) == 1 and (built[0] / "genai_config.json").is_file()  # cached whole, no partial build left
    config = json.loads((built[0] / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    ours, reference = result["engines"]["edgellm-ort"]["ppl"], result["engines"]["llama.cpp"]["ppl"]
    # Measured on 1024 tokens: ours 24.10, llama.cpp 24.09, GenAI int4 32.56 (symmetric RTN of the Q4_1 weights)
    assert abs(ours / reference - 1) < 0.02
    assert genai["ppl"] > 1.15 * ours
    assert "edgellm-ort/ort-genai-int4" in result["ratios"]
