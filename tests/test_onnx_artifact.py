"""The exported artifact directory as a contract: manifest, atomic write, damaged input, CLI.

One export of the default model (SmolLM2-135M Q4_1, ~2 s) is made per module; every test that damages
a directory works on its own copy (shutil.copytree). Checksums are recomputed here with hashlib, not
with edgellm's helper, so the manifest is judged by an outside oracle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgellm.errors import ConfigError, ContextOverflowError, ModelFormatError
from edgellm.export import onnx_export
from edgellm.export.onnx_export import export_onnx
from edgellm.model.loader import load_model
from edgellm.runtime.generation import GenerationConfig, generate
from edgellm.runtime.registry import create_backend
from edgellm.runtime.sampling import SamplingConfig
from tests.test_cli import edgellm

ARTIFACT_FILES = {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_spec.json", "manifest.json"}
PROMPT = "The capital of France is"


class InterruptedExport(RuntimeError):
    """Stands in for a crash, a full disk or Ctrl-C halfway through an export."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _reseal(directory: Path, name: str) -> None:
    """Update one file's manifest entry so that size and checksum match its (tampered) contents."""
    manifest = _manifest(directory)
    path = directory / name
    manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _ort(directory: Path):
    return create_backend("onnxruntime", load_model(directory), threads=2)


def _interrupt(monkeypatch, exc: type[BaseException] = InterruptedExport) -> None:
    def fail(*args, **kwargs):
        raise exc("interrupted while writing the manifest")

    monkeypatch.setattr(onnx_export, "_write_manifest", fail)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def backend(artifact):
    return _ort(artifact)


# --- 1. the manifest and the graph -------------------------------------------------------------------


def test_manifest_describes_the_export(artifact, model):
    manifest = _manifest(artifact)
    for key in ("format", "backend", "opset", "edgellm_version", "config", "layers", "files", "plan"):
        assert key in manifest, f"manifest lacks {key!r}: {sorted(manifest)}"
    assert manifest["format"] == "edgellm-artifact"
    assert manifest["backend"] == "onnxruntime"
    assert isinstance(manifest["opset"], int) and manifest["opset"] >= 21
    assert manifest["config"]["n_layers"] == model.config.n_layers == 30
    assert manifest["config"]["vocab_size"] == model.config.vocab_size


def test_manifest_lists_every_file_with_size_and_sha256(artifact):
    manifest = _manifest(artifact)
    on_disk = {p.name for p in artifact.iterdir()}
    assert on_disk == ARTIFACT_FILES
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for name, entry in manifest["files"].items():
        path = artifact / name
        assert entry["bytes"] == path.stat().st_size, name
        assert entry["sha256"] == _sha256(path), name


def test_manifest_layer_formats(artifact, model):
    layers = _manifest(artifact)["layers"]
    blk = {name: fmt for name, fmt in layers.items() if name.startswith("blk.")}
    assert len(blk) == 7 * model.config.n_layers
    wrong = {name: fmt for name, fmt in blk.items() if fmt != "Q4_1 transcode · edgellm BlockMatMul"}
    assert not wrong, f"{len(wrong)} linears not kept as Q4_1 blocks, e.g. {list(wrong.items())[:3]}"
    assert layers["lm_head"] == "Q8_0 transcode · edgellm BlockMatMul"
    assert layers["token_embd"] == "Q8_0 transcode (gather) · edgellm BlockGather"
    assert _manifest(artifact)["graph"]["custom_domains"] == ["com.edgellm"]


def test_graph_passes_the_checker_and_has_the_fused_operators(artifact, model):
    onnx.checker.check_model(str(artifact / "model.onnx"))
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    n_layers = model.config.n_layers

    def dims(value_info) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    outputs = {o.name: o for o in graph.output}
    presents = [name for name in outputs if name.startswith("present.")]
    assert len(presents) == 2 * n_layers
    for name in presents:
        seq = outputs[name].type.tensor_type.shape.dim[2]
        assert seq.dim_param and not seq.dim_value, f"{name}: sequence dim is {dims(outputs[name])}"
    logits_seq = outputs["logits"].type.tensor_type.shape.dim[1]
    assert logits_seq.dim_param, f"logits: sequence dim is {dims(outputs['logits'])}"

    ops: dict[str, list[str]] = {}
    for node in graph.node:
        ops.setdefault(node.op_type, []).append(node.name)
    for op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "BlockMatMul", "BlockGather"):
        assert op in ops, f"no {op} node; operators: {sorted(ops)}"
    assert len(ops["GroupQueryAttention"]) == n_layers
    qkv = [name for name in ops["BlockMatMul"] if name.endswith("attn_qkv")]
    assert len(qkv) == n_layers, f"fused QKV BlockMatMul: {len(qkv)}, expected {n_layers}"
    # the Q4_1 correction's nodes exist only in the stock-op lowering (--kernel matmulnbits)
    assert not {"MatMulNBits", "Gemm", "ReduceSum"} & set(ops)


def test_the_valid_export_loads_and_runs(backend, tokenizer, model):
    ids = tokenizer.encode(PROMPT)
    logits = backend.open_session(max_tokens=16).forward(np.array(ids), all_logits=True)
    assert logits.shape == (len(ids), model.config.vocab_size)
    assert np.isfinite(logits).all()


# --- 2. atomic write ---------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [InterruptedExport, KeyboardInterrupt])
def test_interrupted_export_leaves_nothing(model, tmp_path, monkeypatch, exc):
    _interrupt(monkeypatch, exc)
    out = tmp_path / "out"
    with pytest.raises(exc, match="interrupted"):
        export_onnx(model, out)
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == [], "a partial export directory was left behind"


def test_interrupted_overwrite_keeps_the_old_export(model, copy, monkeypatch):
    before = {p.name: _sha256(p) for p in copy.iterdir() if p.name != "model.onnx.data"}
    _interrupt(monkeypatch)
    with pytest.raises(InterruptedExport):
        export_onnx(model, copy, overwrite=True)
    assert {p.name: _sha256(p) for p in copy.iterdir() if p.name != "model.onnx.data"} == before
    assert _leftovers(copy.parent, copy.name) == []
    _ort(copy)  # verifies every checksum, then builds the ONNX Runtime session


def test_overwrite_replaces_the_export(model, copy):
    (copy / "stale.txt").write_text("from an older export")
    export_onnx(model, copy, overwrite=True)
    assert {p.name for p in copy.iterdir()} == ARTIFACT_FILES
    assert _leftovers(copy.parent, copy.name) == []


def test_existing_directory_without_overwrite_is_refused(model, copy):
    before = _sha256(copy / "manifest.json")
    with pytest.raises(ConfigError, match=r"exists; pass overwrite=True \(CLI: --force\)"):
        export_onnx(model, copy)
    assert _sha256(copy / "manifest.json") == before


# --- 3. damaged or mismatched directories ----------------------------------------------------------


def test_missing_graph_file(copy):
    (copy / "model.onnx").unlink()
    with pytest.raises(ModelFormatError, match=r"model\.onnx is missing \(listed in manifest\.json\)"):
        _ort(copy)


def test_truncated_weights(copy):
    data = copy / "model.onnx.data"
    size = data.stat().st_size
    os.truncate(data, size - 4096)
    with pytest.raises(ModelFormatError, match=rf"model\.onnx\.data: size {size - 4096} bytes, manifest says {size} "
                                               r"\(truncated or replaced\)"):
        _ort(copy)


def test_one_flipped_byte_in_the_weights(copy):
    data = copy / "model.onnx.data"
    offset = data.stat().st_size // 2
    with data.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ModelFormatError, match=r"model\.onnx\.data: checksum mismatch"):
        _ort(copy)


def test_missing_manifest(copy, model):
    (copy / "manifest.json").unlink()
    with pytest.raises(ModelFormatError, match=r"no manifest\.json: not an edgellm export \(or an interrupted one\)"):
        load_model(copy)
    from edgellm.runtime.onnxruntime_cpu import OrtBackend

    with pytest.raises(ModelFormatError, match=r"no manifest\.json; not an edgellm export \(or an interrupted one\)"):
        OrtBackend(model.config, copy)


def test_manifest_that_is_not_json(copy):
    (copy / "manifest.json").write_text('{"format": "edgellm-artifact", "files": {')
    with pytest.raises(ModelFormatError, match=r"manifest\.json: corrupt manifest"):
        load_model(copy)


def test_tokenizer_shorter_than_the_vocabulary(copy, model):
    spec_path = copy / "tokenizer_spec.json"
    spec = json.loads(spec_path.read_text())
    spec["tokens"] = spec["tokens"][:-1]
    spec["token_types"] = spec["token_types"][:-1]
    spec_path.write_text(json.dumps(spec))
    _reseal(copy, "tokenizer_spec.json")  # a consistent manifest: the mismatch itself must be caught
    vocab = model.config.vocab_size
    with pytest.raises(ModelFormatError, match=rf"tokenizer has {vocab - 1} tokens but the model's vocabulary is "
                                               rf"{vocab} \(tokenizer and model do not belong together\)"):
        load_model(copy)


def test_garbage_graph_with_a_matching_checksum(copy):
    (copy / "model.onnx").write_bytes(b"this is not a protobuf \x00\xff" * 64)
    _reseal(copy, "model.onnx")
    with pytest.raises(ModelFormatError, match=r"model\.onnx: ONNX Runtime cannot load the graph"):
        _ort(copy)


@pytest.mark.parametrize("field, value", [("config", None), ("files", []), ("graph", "absent")])
def test_manifest_field_of_the_wrong_type(copy, field, value):
    manifest = _manifest(copy)
    if value == "absent":
        del manifest[field]
    else:
        manifest[field] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=rf"manifest.*{field}"):
        _ort(copy)


def test_an_op_domain_without_kernels_is_named(copy):
    manifest = _manifest(copy)
    manifest["graph"]["custom_domains"] = ["com.edgellm", "com.example.fpga"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=r"op domains \['com.example.fpga'\] that this edgellm has no kernels for"):
        _ort(copy)


def test_custom_domains_of_the_wrong_type_are_named(copy):
    manifest = _manifest(copy)
    manifest["graph"]["custom_domains"] = "com.edgellm"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=r"manifest graph.custom_domains must be a list of names"):
        _ort(copy)


def test_a_machine_without_a_compiler_gets_a_clear_error(copy, monkeypatch):
    from edgellm.runtime import ort_kernels

    monkeypatch.setattr(ort_kernels, "build", lambda march="native": ort_kernels._compiler())
    monkeypatch.setattr(ort_kernels.shutil, "which", lambda name: None)
    monkeypatch.setenv("CXX", "")
    with pytest.raises(ConfigError, match="need a C\\+\\+ compiler .* --kernel matmulnbits"):
        _ort(copy)


def test_prompt_longer_than_the_session_context(backend, tokenizer):
    session = backend.open_session(max_tokens=8)
    with pytest.raises(ContextOverflowError, match=r"0 cached \+ 9 new tokens exceed this session's context of 8"):
        session.forward(np.arange(100, 109))
    session.forward(np.arange(100, 108))  # exactly full is fine ...
    with pytest.raises(ContextOverflowError, match=r"8 cached \+ 1 new tokens exceed"):
        session.forward(np.array([108]))  # ... one more decode step is not
    with pytest.raises(ContextOverflowError, match=r"requested context 8193 exceeds the model's 8192"):
        backend.open_session(max_tokens=8193)

    ids = tokenizer.encode("Alice was beginning to get very tired of sitting by her sister on the bank")
    assert len(ids) > 8
    config = GenerationConfig(max_new_tokens=4, sampling=SamplingConfig(greedy=True))
    with pytest.raises(ContextOverflowError, match=rf"prompt of {len(ids)} tokens does not fit the context of 8"):
        list(generate(backend.open_session(max_tokens=8), tokenizer, ids, config))


# --- 4. the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "smollm2-onnx"
    proc = edgellm("export", "onnx", "-o", str(out))
    assert f"wrote {out}" in proc.stdout and "opset" in proc.stdout, proc.stdout
    return out


def test_cli_export_then_info(cli_export):
    assert {p.name for p in cli_export.iterdir()} == ARTIFACT_FILES
    data = json.loads(edgellm("info", str(cli_export), "--json").stdout)
    assert data["architecture"] == "llama"
    assert (data["n_layers"], data["hidden_size"], data["n_heads"], data["n_kv_heads"]) == (30, 576, 9, 3)
    assert (data["vocab_size"], data["context_length"]) == (49152, 8192)
    assert data["source"] == str(cli_export)


def test_cli_export_refuses_an_existing_directory_without_force(cli_export):
    proc = edgellm("export", "onnx", "-o", str(cli_export), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgellm: error:") and "--force" in lines[0]


def test_cli_generate_runs_on_the_manifest_backend(cli_export):
    out = json.loads(edgellm("generate", str(cli_export), "-p", PROMPT, "-n", "8", "--greedy", "--json").stdout)
    assert out["backend"] == "onnxruntime"
    assert len(out["tokens"]) == 8 and "Paris" in out["text"], out


def test_cli_eval_ppl(cli_export):
    out = json.loads(edgellm("eval", "ppl", str(cli_export), "--max-tokens", "256", "--window", "128",
                             "--json").stdout)
    assert out["backend"] == "onnxruntime"
    assert out["n_predictions"] == 2 * 127
    assert 5 < out["ppl"] < 80


@pytest.mark.slow
@pytest.mark.llamacpp
def test_cli_bench_against_llamacpp(cli_export, tmp_path):
    result_path = tmp_path / "bench.json"
    edgellm("bench", str(cli_export), "--vs", "llama.cpp", "--threads", "2", "--rounds", "1", "--reps", "1",
            "--n-prompt", "16", "--n-decode", "8", "--ppl-tokens", "0", "--json", str(result_path),
            "--lookup", "3", "--prompt-corpus", "asyoulik.txt")
    result = json.loads(result_path.read_text())
    keys = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "file_mb", "decode_lookup_tok_s")
    for engine in result["engines"].values():  # 8 tokens: at least one per pass, at most 1 + 3 guesses
        assert 1 <= engine["lookup_tokens_per_pass"] <= 4 and isinstance(engine["lookup_same_tokens"], bool)
        assert engine["lookup_baseline_tok_s"] > 0 and len(engine["lookup_first_difference"]) == 1
    assert result["config"]["prompt_text"] == "asyoulik.txt" and result["config"]["lookup"] == 3
    assert set(result["engines"]) == {"edgellm-ort", "llama.cpp"}
    for label, engine in result["engines"].items():
        for key in keys:
            assert isinstance(engine[key], float) and engine[key] > 0, (label, key, engine.get(key))
    for label, engine in result["engines"].items():  # the resident set grows stage by stage up to its peak
        stages = [engine[k] for k in ("rss_python_mb", "rss_model_description_mb", "rss_engine_ready_mb",
                                      "rss_after_runs_mb")]
        assert 10 < stages[0] < stages[1] < stages[2] <= stages[3] + 1 <= engine["peak_rss_mb"] + 1, (label, stages)
    assert result["machine"]["commit"]
    ratios = result["ratios"]["edgellm-ort/llama.cpp"]
    for key in keys:
        assert isinstance(ratios[key], float) and ratios[key] > 0, (key, ratios.get(key))
    assert result["prompt_tokens"] == 16


def test_cli_generate_on_a_corrupted_export_is_one_error_line(cli_export, tmp_path):
    bad = Path(shutil.copytree(cli_export, tmp_path / "bad"))
    data = bad / "model.onnx.data"
    with data.open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    proc = edgellm("generate", str(bad), "-p", PROMPT, "-n", "4", "--greedy", "--json", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("edgellm: error:"), proc.stderr
    assert "model.onnx.data: checksum mismatch" in lines[0]
    assert proc.stdout == ""
