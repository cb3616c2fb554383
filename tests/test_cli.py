"""The command-line contract of issue 2 (keys, flags, exit codes), run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_gguf import write_tiny_gguf


def edgellm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli.main", *args], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgellm {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def test_info_json_has_the_contract_keys():
    data = json.loads(edgellm("info", "--json").stdout)
    assert data["architecture"] == "llama"
    assert (data["n_layers"], data["hidden_size"], data["n_heads"], data["n_kv_heads"]) == (30, 576, 9, 3)
    assert (data["vocab_size"], data["context_length"]) == (49152, 8192)


def test_tokenize_text_file_equals_the_api(tmp_path, tokenizer):
    text = "Alice was beginning to get very tired.\r\nÜber 123 ünïcode 🤖\n"
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode("utf-8"))
    ids = json.loads(edgellm("tokenize", "--text-file", str(f)).stdout)
    assert ids == tokenizer.encode(text)


def test_generate_json_greedy_equals_the_api(reference, tokenizer):
    from edgellm.runtime.generation import GenerationConfig, generate
    from edgellm.runtime.sampling import SamplingConfig

    out = json.loads(edgellm("generate", "-p", "The capital of France is", "-n", "12", "--greedy", "--json").stdout)
    cfg = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(greedy=True))
    events = list(generate(reference.open_session(max_tokens=64), tokenizer,
                           tokenizer.encode("The capital of France is"), cfg))
    assert out["tokens"] == [e.token_id for e in events]
    assert out["text"] == "".join(e.text for e in events)


def test_generate_backend_llamacpp():
    out = json.loads(edgellm("generate", "-p", "The capital of France is", "-n", "6", "--greedy", "--json",
                             "--backend", "llama.cpp", "--threads", "2").stdout)
    assert "Paris" in out["text"] and len(out["tokens"]) == 6


def test_eval_ppl_json_on_a_text_file(tmp_path, alice_text):
    f = tmp_path / "alice.txt"
    f.write_bytes(alice_text.encode("utf-8"))
    for backend in ("reference", "llama.cpp"):
        out = json.loads(edgellm("eval", "ppl", "--text-file", str(f), "--max-tokens", "256", "--window", "128",
                                 "--json", "--backend", backend).stdout)
        assert out["n_predictions"] == 2 * 127
        assert 5 < out["ppl"] < 80


def test_chat_reads_stdin():
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli.main", "chat", "--greedy", "-n", "30"],
                          input="What is 2+2?\n", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "4" in proc.stdout


def test_generate_on_a_tiny_gguf(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = json.loads(edgellm("generate", str(path), "-p", "ab", "-n", "5", "--greedy", "--json",
                             "--ignore-eos").stdout)
    assert len(out["tokens"]) == 5


@pytest.mark.parametrize("args, message", [
    (("info", "/no/such/model.gguf"), "no such model"),
    (("generate", "-p", "hi", "--backend", "nope"), "valid backends: llama.cpp, onnxruntime, reference"),
    (("eval", "ppl", "--text-file", "/no/such.txt", "--json"), "No such file"),
    (("generate", "-p", "hi", "--top-p", "0"), "top_p"),
    (("info", "unknown-model-id"), "valid models"),
    (("generate", "-p", "hi", "--seed", "-1"), "seed must be >= 0"),
    (("generate", "-p", "hi", "--threads", "0"), "expected a positive integer"),
    (("bench", "--n-prompt", "9000", "--ppl-tokens", "0"), "exceed the model's context"),
    (("bench", "--also", "/no/such/export", "--ppl-tokens", "0", "--rounds", "1"), "not an ONNX export directory"),
    (("bench", "--also", "DIR_A/onnx", "--also", "DIR_B/onnx", "--ppl-tokens", "0"), "need distinct names"),
    (("bench", "--prompt-corpus", "fields.c", "--ppl-tokens", "0"), "valid prompt corpus files: alice29.txt"),
    (("generate", "-p", "hi", "--lookup", "4", "--offload", "http://127.0.0.1:9"), "does not combine with --offload"),
    (("generate", "-p", "hi", "--lookup", "-1"), "--lookup"),
])
def test_errors_are_one_line_with_nonzero_exit(args, message, tmp_path):
    for part in ("DIR_A", "DIR_B"):  # two real export-looking directories with the same last name
        (tmp_path / part / "onnx").mkdir(parents=True)
        (tmp_path / part / "onnx" / "model.onnx").write_bytes(b"")
    args = tuple(str(tmp_path / a) if a.startswith("DIR_") else a for a in args)
    proc = edgellm(*args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm: error:") and message in lines[0], proc.stderr


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    proc = edgellm("info", str(bad), check=False)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_help_everywhere():
    for cmd in (["--help"], ["info", "--help"], ["generate", "--help"], ["eval", "ppl", "--help"], ["chat", "--help"],
                ["tokenize", "--help"], ["export", "onnx", "--help"], ["bench", "--help"], ["compress", "--help"]):
        assert edgellm(*cmd).stdout.startswith("usage: edgellm")


def test_missing_text_file_path_is_reported(tmp_path):
    missing = Path(tmp_path) / "absent.txt"
    proc = edgellm("tokenize", "--text-file", str(missing), check=False)
    assert proc.returncode == 2 and "absent.txt" in proc.stderr


def test_bench_table_reports_every_ratio():
    from edgellm.bench.speed import add_ratios, format_table

    engines = {"edgellm-ort": {"decode_tok_s": 150.0}, "ort:dense": {"decode_tok_s": 120.0},
               "llama.cpp": {"decode_tok_s": 100.0}}
    result = {"engines": engines, "ratios": {"edgellm-ort/llama.cpp": {"decode_tok_s": 1.5},
                                             "ort:dense/llama.cpp": {"decode_tok_s": 1.2}}}
    add_ratios(result, "edgellm-ort", ["ort:dense"])
    assert result["ratios"]["edgellm-ort/ort:dense"]["decode_tok_s"] == pytest.approx(1.25)
    table = format_table(result).splitlines()
    assert table[0].endswith("| edgellm-ort/llama.cpp | ort:dense/llama.cpp | edgellm-ort/ort:dense |")
    assert table[2] == "| decode_tok_s | 150.00 | 120.00 | 100.00 | 1.50x | 1.20x | 1.25x |"


def test_bench_table_shows_rss_stages_and_a_dash_where_an_engine_has_none():
    from edgellm.bench.speed import format_table
    from edgellm.bench.speed_worker import RSS_STAGE_KEYS

    engines = {"edgellm-ort": {"peak_rss_mb": 224.0, **dict.fromkeys(RSS_STAGE_KEYS, 50.0)},
               "ort-genai-int4": {"peak_rss_mb": 250.0, "rss_python_mb": 28.0},  # GenAI loads no description
               "llama.cpp": {"peak_rss_mb": 187.0, **dict.fromkeys(RSS_STAGE_KEYS, 40.0)}}
    result = {"engines": engines, "ratios": {"edgellm-ort/llama.cpp": {"peak_rss_mb": 224 / 187}}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in format_table(result).splitlines()[2:]}
    assert list(rows) == ["peak_rss_mb", *RSS_STAGE_KEYS]
    assert rows["rss_python_mb"] == "| rss_python_mb | 50.00 | 28.00 | 40.00 | |"
    assert rows["rss_model_description_mb"] == "| rss_model_description_mb | 50.00 | - | 40.00 | |"
