"""Hugging Face directory loader: parity with the GGUF path and transformers, and malformed inputs.

The strongest check converts the real default GGUF model (first 4 layers) into a Hugging Face directory,
undoing llama.cpp's Q/K row permutation, and requires the same logits from both descriptions; transformers
reading that directory is the independent oracle for the "half" RoPE convention.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgellm.errors import (
    MissingTensorError,
    ModelFormatError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from edgellm.model.description import ModelDescription
from edgellm.model.hf_loader import canonical_names, load_hf_directory
from edgellm.model.loader import load_model
from edgellm.model.tensor_names import expected_shapes, hf_name
from edgellm.model.weights import ModelWeights

N_LAYERS = 4  # layers of the real model kept for the parity tests (keeps each test a few seconds)
ATOL = 1e-3  # float32 paths: same weights, summation order differs -> rounding well under 1e-3
TEXT = "The capital of France is Paris. 12345 apples!"

# --- helpers ------------------------------------------------------------------------------------------


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's converter, which did reshape(n_head, 2, r/n_head/2, c).swapaxes(1, 2)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_config(**overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def tiny_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights (HF names) with the shapes a config.json implies."""
    from edgellm.model.config import ModelConfig

    config = ModelConfig(
        architecture="llama", n_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"],
        ffn_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        context_length=cfg["max_position_embeddings"], tie_embeddings=cfg["tie_word_embeddings"],
    )
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        scale = 1.0 if len(shape) == 1 else 0.1
        base = 1.0 if len(shape) == 1 else 0.0
        out[hf_name(name)] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_hf_dir(path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def reference_logits(desc: ModelDescription, ids: list[int]) -> np.ndarray:
    from edgellm.runtime.registry import create_backend

    session = create_backend("reference", desc).open_session(max_tokens=64)
    return session.forward(np.array(ids), all_logits=True)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    diff = np.abs(actual - expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert np.allclose(actual, expected, atol=ATOL, rtol=0), (
        f"{what}: max abs diff {diff.max():.3g} (mean {diff.mean():.3g}) exceeds atol {ATOL}"
    )


def transformers_logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# --- the real model, converted -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_small(model: ModelDescription) -> ModelDescription:
    """The default GGUF model (conftest's session `model`) cut to its first N_LAYERS blocks."""
    full = model
    keep = {n: full.weights[n] for n in expected_shapes(dataclasses.replace(full.config, n_layers=N_LAYERS))}
    return ModelDescription(
        config=dataclasses.replace(full.config, n_layers=N_LAYERS),
        weights=ModelWeights(keep, source=str(full.source)),
        tokenizer=full.tokenizer,
        source=full.source,
    )


@pytest.fixture(scope="module")
def smol_hf_dir(gguf_small: ModelDescription, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gguf_small written the way Hugging Face stores it: HF names, HF Q/K row order, F32 safetensors."""
    from edgellm.model.tokenizer import Tokenizer

    c, w, spec = gguf_small.config, gguf_small.weights, gguf_small.tokenizer
    tensors = {}
    for name in expected_shapes(c):
        values = w.float(name)
        if name.endswith("attn_q.weight"):
            values = unpermute_qk(values, c.n_heads)
        elif name.endswith("attn_k.weight"):
            values = unpermute_qk(values, c.n_kv_heads)
        tensors[hf_name(name)] = np.ascontiguousarray(values, dtype=np.float32)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": c.n_layers, "hidden_size": c.hidden_size,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "intermediate_size": c.ffn_size, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.norm_eps, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id,
    }
    path = write_hf_dir(tmp_path_factory.mktemp("smol_hf"), cfg, tensors)
    (path / "tokenizer.json").write_text(Tokenizer(spec)._tok.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": spec.tokens[spec.bos_id], "eos_token": spec.tokens[spec.eos_id],
        "pad_token": spec.tokens[spec.pad_id], "add_bos_token": spec.add_bos,
        "chat_template": spec.chat_template,
    }))
    return path


@pytest.fixture(scope="module")
def smol_hf(smol_hf_dir: Path) -> ModelDescription:
    return load_hf_directory(smol_hf_dir)


@pytest.fixture(scope="module")
def prompt_ids(gguf_small: ModelDescription) -> list[int]:
    from edgellm.model.tokenizer import Tokenizer

    return Tokenizer(gguf_small.tokenizer).encode(TEXT)


def test_converted_real_model_config(smol_hf: ModelDescription, gguf_small: ModelDescription) -> None:
    expected = dataclasses.replace(gguf_small.config, rope_style="half", name=smol_hf.config.name)
    assert smol_hf.config == expected
    assert smol_hf.file_type == "F32"
    assert smol_hf.weights["blk.0.attn_q.weight"].qtype == "F32"


def test_hf_logits_match_gguf(smol_hf: ModelDescription, gguf_small: ModelDescription,
                              prompt_ids: list[int]) -> None:
    assert len(prompt_ids) > 8
    assert_close(reference_logits(smol_hf, prompt_ids), reference_logits(gguf_small, prompt_ids),
                 "reference on HF dir vs reference on GGUF")


def test_hf_logits_match_transformers(smol_hf_dir: Path, smol_hf: ModelDescription,
                                      prompt_ids: list[int]) -> None:
    assert_close(reference_logits(smol_hf, prompt_ids), transformers_logits(smol_hf_dir, prompt_ids),
                 "edgellm reference vs transformers LlamaForCausalLM")


def test_tokenizer_from_tokenizer_json(smol_hf: ModelDescription, gguf_small: ModelDescription) -> None:
    from edgellm.model.tokenizer import Tokenizer

    hf, gg = smol_hf.tokenizer, gguf_small.tokenizer
    assert hf is not None and hf.hf_json is not None
    assert hf.tokens == gg.tokens
    control = {i for i, t in enumerate(gg.token_types) if t == 3}
    assert {i for i, t in enumerate(hf.token_types) if t == 3} == control
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.add_bos) == (gg.bos_id, gg.eos_id, gg.pad_id, gg.add_bos)
    assert hf.chat_template == gg.chat_template
    text = "<|im_start|>user\nHi there, 2024 was 365 days.<|im_end|>"
    for special in (False, True):
        assert Tokenizer(hf).encode(text, parse_special=special) == Tokenizer(gg).encode(
            text, parse_special=special)


def test_load_model_dispatches_to_hf(smol_hf_dir: Path) -> None:
    desc = load_model(smol_hf_dir)
    assert desc.source == smol_hf_dir and desc.config.rope_style == "half"
    assert load_model(smol_hf_dir / "model.safetensors").config == desc.config


# --- tiny seeded models -------------------------------------------------------------------------------


def test_tiny_model_loads_without_tokenizer(tmp_path: Path) -> None:
    cfg = hf_config()
    tensors = tiny_tensors(cfg)
    desc = load_hf_directory(write_hf_dir(tmp_path, cfg, tensors))
    c = desc.config
    assert (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.ffn_size, c.vocab_size) == (2, 64, 4, 2, 128, 256)
    assert (c.head_dim, c.context_length, c.rope_style, c.tie_embeddings) == (16, 128, "half", True)
    assert c.rope_scaling.kind == "none" and c.norm_eps == 1e-5
    assert desc.tokenizer is None
    assert "output.weight" not in desc.weights
    for hf, canonical in canonical_names(2).items():
        if hf in tensors:
            np.testing.assert_array_equal(desc.weights.float(canonical), tensors[hf])
    assert desc.metadata["hf.architecture"] == "LlamaForCausalLM"


def test_bf16_and_f16_tensors_decode(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    cfg = hf_config()
    tensors = {k: torch.from_numpy(v) for k, v in tiny_tensors(cfg).items()}
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.bfloat16)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].half()
    tmp_path.joinpath("config.json").write_text(json.dumps(cfg))
    save_torch(tensors, str(tmp_path / "model.safetensors"))
    desc = load_hf_directory(tmp_path)
    emb, up = desc.weights["token_embd.weight"], desc.weights["blk.0.ffn_up.weight"]
    assert (emb.qtype, emb.raw.dtype, up.qtype, up.raw.dtype) == ("BF16", np.uint16, "F16", np.float16)
    np.testing.assert_array_equal(emb.to_float(), tensors["model.embed_tokens.weight"].float().numpy())
    np.testing.assert_array_equal(up.to_float(), tensors["model.layers.0.mlp.up_proj.weight"].float().numpy())
    assert desc.file_type == "F32"


def test_sharded_checkpoint(tmp_path: Path) -> None:
    cfg = hf_config()
    tensors = tiny_tensors(cfg)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    desc = load_hf_directory(tmp_path)
    np.testing.assert_array_equal(desc.weights.float("blk.1.ffn_down.weight"),
                                  tensors["model.layers.1.mlp.down_proj.weight"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"model-00002-of-00002\.safetensors.*missing"):
        load_hf_directory(tmp_path)


@pytest.mark.parametrize("model_type, rope", [
    ("llama", None),
    ("llama", {"rope_type": "linear", "factor": 2.0}),
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}),
    ("mistral", None),
])
def test_tiny_model_matches_transformers(tmp_path: Path, model_type: str, rope: dict | None) -> None:
    """transformers writes the directory itself (its config format, untied lm_head) and is the oracle."""
    import torch
    import transformers
    torch.manual_seed(0)
    config_cls = transformers.LlamaConfig if model_type == "llama" else transformers.MistralConfig
    model_cls = transformers.LlamaForCausalLM if model_type == "llama" else transformers.MistralForCausalLM
    extra = {"rope_scaling": rope} if rope else {}
    config = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=256, max_position_embeddings=128,
                        rope_theta=500.0, tie_word_embeddings=False, initializer_range=0.2, **extra)
    model = model_cls(config)
    with torch.no_grad():  # norms start at 1.0; perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    desc = load_hf_directory(tmp_path)
    assert desc.config.rope_scaling.kind == (rope or {}).get("rope_type", "none")
    assert not desc.config.tie_embeddings and "output.weight" in desc.weights
    ids = list(range(3, 63))  # long enough for scaled and unscaled frequencies to differ
    assert_close(reference_logits(desc, ids), transformers_logits(tmp_path, ids),
                 f"{model_type} rope={rope}: edgellm reference vs transformers")


def test_tokenizer_special_ids_from_files(tmp_path: Path) -> None:
    """bos/eos from tokenizer_config when config.json lacks them; extra eos from generation_config."""
    vocab = {"a": 0, "b": 1, "ab": 2}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": None, "decoder": None,
        "added_tokens": [
            {"id": 3, "content": "<s>", "special": True, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False},
            {"id": 5, "content": "</s>", "special": True, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False},
            {"id": 6, "content": "<eot>", "special": True, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False},
        ],
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [3], "tokens": ["<s>"]}}},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": [["a", "b"]]},
    }
    cfg = hf_config(vocab_size=8)
    cfg.pop("bos_token_id")
    cfg.pop("eos_token_id")
    write_hf_dir(tmp_path, cfg, tiny_tensors(cfg))
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": [{"name": "default", "template": "{{ x }}"}, {"name": "tool_use", "template": "t"}],
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    spec = load_hf_directory(tmp_path).tokenizer
    assert spec is not None
    assert spec.tokens == ("a", "b", "ab", "<s>", "[PAD4]", "</s>", "<eot>", "[PAD7]")
    assert spec.token_types == (1, 1, 1, 3, 5, 3, 3, 5)
    assert (spec.bos_id, spec.eos_id, spec.extra_eos_ids, spec.add_bos) == (3, 5, (6,), True)
    assert spec.chat_template == "{{ x }}"


def test_config_variants(tmp_path: Path) -> None:
    """Legacy rope keys, a Mistral sliding window, a config without "architectures"."""
    cfg = hf_config(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=1e6)
    c = load_hf_directory(write_hf_dir(tmp_path / "a", cfg, tiny_tensors(cfg))).config
    assert (c.rope_scaling.kind, c.rope_scaling.factor, c.rope_theta) == ("linear", 4.0, 1e6)
    cfg = hf_config(architectures=None, model_type="mistral", sliding_window=64)
    c = load_hf_directory(write_hf_dir(tmp_path / "b", cfg, tiny_tensors(cfg))).config
    assert (c.architecture, c.context_length) == ("llama", 64)  # full attention is exact inside the window


# --- malformed inputs ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    cfg = hf_config()
    return write_hf_dir(tmp_path / "model", cfg, tiny_tensors(cfg))


def test_missing_config_json(tiny_dir: Path) -> None:
    (tiny_dir / "config.json").unlink()
    with pytest.raises(ModelFormatError, match=r"config\.json is missing"):
        load_hf_directory(tiny_dir)


def test_malformed_config_json(tiny_dir: Path) -> None:
    (tiny_dir / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ModelFormatError, match=r"config\.json: malformed JSON at line 1"):
        load_hf_directory(tiny_dir)


def test_unsupported_architecture(tiny_dir: Path) -> None:
    (tiny_dir / "config.json").write_text(json.dumps(hf_config(architectures=["GPT2LMHeadModel"])))
    with pytest.raises(UnsupportedArchitectureError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_hf_directory(tiny_dir)


@pytest.mark.parametrize("key", ["num_hidden_layers", "intermediate_size", "max_position_embeddings"])
def test_missing_config_field(tiny_dir: Path, key: str) -> None:
    cfg = hf_config()
    del cfg[key]
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=rf"config\.json: field '{key}' is missing"):
        load_hf_directory(tiny_dir)


def test_bad_config_value(tiny_dir: Path) -> None:
    (tiny_dir / "config.json").write_text(json.dumps(hf_config(num_attention_heads=3)))
    with pytest.raises(ModelFormatError, match=r"config\.json: .*not divisible"):
        load_hf_directory(tiny_dir)
    (tiny_dir / "config.json").write_text(json.dumps(hf_config(rope_scaling={"rope_type": "yarn"})))
    with pytest.raises(UnsupportedArchitectureError, match=r"'yarn'.*supported: default, linear, llama3"):
        load_hf_directory(tiny_dir)
    (tiny_dir / "config.json").write_text(json.dumps(hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0})))
    with pytest.raises(ModelFormatError, match=r"config\.json: llama3 rope scaling needs original_max_position"):
        load_hf_directory(tiny_dir)
    (tiny_dir / "config.json").write_text(json.dumps(hf_config(hidden_size="64")))
    with pytest.raises(ModelFormatError, match=r"field 'hidden_size' should be an integer, found '64'"):
        load_hf_directory(tiny_dir)


def test_no_safetensors_file(tiny_dir: Path) -> None:
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match=r"neither model\.safetensors .*found: pytorch_model\.bin"):
        load_hf_directory(tiny_dir)


def test_missing_tensor(tmp_path: Path) -> None:
    cfg = hf_config()
    tensors = tiny_tensors(cfg)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(MissingTensorError, match=r"1 required tensor.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf_directory(write_hf_dir(tmp_path, cfg, tensors))


def test_wrong_shape(tmp_path: Path) -> None:
    cfg = hf_config()
    tensors = tiny_tensors(cfg)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(TensorShapeError, match=r"k_proj\.weight: expected \(32, 64\), found \(64, 64\)"):
        load_hf_directory(write_hf_dir(tmp_path, cfg, tensors))


def test_truncated_safetensors(tiny_dir: Path) -> None:
    file = tiny_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: corrupt or truncated safetensors"):
        load_hf_directory(tiny_dir)
    file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ModelFormatError, match=r"corrupt or truncated"):
        load_hf_directory(tiny_dir)


def test_unsupported_dtype(tmp_path: Path) -> None:
    cfg = hf_config()
    tensors = tiny_tensors(cfg)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.int64)  # ignored: not needed
    with pytest.raises(UnsupportedTensorTypeError, match=r"'model\.norm\.weight' has dtype F64; supported: F32"):
        load_hf_directory(write_hf_dir(tmp_path, cfg, tensors))


def test_import_and_load_do_not_import_torch(tiny_dir: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from edgellm.model.hf_loader import load_hf_directory; "
            f"d = load_hf_directory({str(tiny_dir)!r}); d.weights.float('token_embd.weight'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
