"""Read a Hugging Face Llama-family directory into a ModelDescription.

    config.json                          hyper-parameters        -> ModelConfig
    model.safetensors                    weights (or the index below)
    model.safetensors.index.json         + shards: weight_map {hf name: shard file}
    tokenizer.json                       optional                -> TokenizerSpec(hf_json=...)
    tokenizer_config.json                optional: special tokens, add_bos, chat_template
    generation_config.json               optional: extra end-of-generation ids
    chat_template.jinja                  optional: the chat template of newer checkpoints

Safetensors files are checked by the `safetensors` library and then memory-mapped with numpy, so loading
reads headers only; each tensor is converted to float32 on first use (bf16 by bit shifting, no torch).
Hugging Face Llama rotates feature pairs (i, i + d/2) ("half" RoPE); the GGUF path differs only because
llama.cpp's converter permutes the Q/K rows instead.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    ConfigError,
    MissingTensorError,
    ModelFormatError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from edgellm.model.config import ModelConfig, RopeScaling
from edgellm.model.description import ModelDescription, TokenizerSpec
from edgellm.model.tensor_names import GLOBAL_TENSORS, LAYER_TENSORS, expected_shapes, hf_name
from edgellm.model.weights import ModelWeights, WeightTensor

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Hugging Face class (config "architectures") -> edgellm architecture. Mistral's weights and math are
# Llama's; its sliding window is honoured by capping the context (see _context_length).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}
# config "model_type" -> class, for configs saved without "architectures".
MODEL_TYPES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

# safetensors dtype -> (qtype, little-endian numpy storage dtype); bf16 is stored as its uint16 bits.
SAFETENSORS_DTYPES: dict[str, tuple[str, str]] = {
    "F32": ("F32", "<f4"),
    "F16": ("F16", "<f2"),
    "BF16": ("BF16", "<u2"),
}

# ModelConfig field <- config.json key, for the keys every Llama config.json carries.
REQUIRED_INT_KEYS: dict[str, str] = {
    "n_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "n_heads": "num_attention_heads",
    "ffn_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
}
# rope_type / type in config.json -> RopeScaling.kind ("default" is no scaling).
ROPE_TYPES: dict[str, str] = {"default": "none", "linear": "linear", "llama3": "llama3"}
# transformers' LlamaConfig defaults for keys a config.json may omit.
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_RMS_NORM_EPS = 1e-6

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # llama.cpp token types


def load_hf_directory(path: str | Path) -> ModelDescription:
    """Load config, weights and tokenizer of a Hugging Face Llama-family directory.

    Raises a ModelFormatError subclass naming the file, field or tensor when anything is missing,
    malformed or unsupported.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelFormatError(f"{path}: not a directory (expected a Hugging Face model directory)")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFormatError(f"{path}: {CONFIG_FILE} is missing (a Hugging Face model directory needs one)")
    hf_config = _read_json(config_path)
    hf_arch = _architecture(config_path, hf_config)
    tensors, dtype_counts = _read_weights(path, hf_config)
    config = _model_config(config_path, hf_config, hf_arch, has_lm_head="output.weight" in tensors)
    if config.tie_embeddings:  # transformers ignores a stored lm_head when tied, so do we
        tensors.pop("output.weight", None)
    if config.rope_scaling.kind == "llama3":  # stored as llama.cpp does; the reference model applies it
        try:
            factors = llama3_freq_factors(config)
        except ConfigError as exc:
            raise ModelFormatError(f"{config_path}: {exc}") from None
        tensors["rope_freqs.weight"] = WeightTensor.from_array("rope_freqs.weight", factors)
    description = ModelDescription(
        config=config,
        weights=ModelWeights(tensors, source=str(path)),
        tokenizer=_tokenizer(path, hf_config, config.vocab_size),
        source=path,
        file_type=max(dtype_counts, key=dtype_counts.get) if dtype_counts else "",
        metadata={"hf.architecture": hf_arch, **{f"hf.{k}": v for k, v in hf_config.items()}},
    )
    _check_tensors(path, config, description.weights)
    description.validate()
    return description


def _check_tensors(path: Path, config: ModelConfig, weights: ModelWeights) -> None:
    """Report every missing or misshapen tensor under its Hugging Face name (validate() uses GGUF's)."""
    missing: list[str] = []
    wrong: list[str] = []
    for name, shape in expected_shapes(config).items():
        if name not in weights:
            missing.append(hf_name(name))
        elif tuple(weights[name].shape) != shape:
            wrong.append(f"{hf_name(name)}: expected {shape}, found {tuple(weights[name].shape)}")
    if missing:
        raise MissingTensorError(
            f"{path}: {len(missing)} required tensor(s) missing from the safetensors files: "
            + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        )
    if wrong:
        raise TensorShapeError(f"{path}: {len(wrong)} tensor(s) disagree with {CONFIG_FILE}: " + "; ".join(wrong[:5]))


# --- config.json -> ModelConfig ---------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: cannot read ({exc})") from None


def _read_json(path: Path, text: str | None = None) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path) if text is None else text)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _architecture(config_path: Path, cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not archs and cfg.get("model_type") in MODEL_TYPES:
        archs = [MODEL_TYPES[cfg["model_type"]]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    found = ", ".join(map(str, archs)) or f"(none; model_type {cfg.get('model_type')!r})"
    raise UnsupportedArchitectureError(
        f"{config_path}: architecture {found} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _int_field(config_path: Path, cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:
        if default is not None:
            return default
        raise ModelFormatError(f"{config_path}: field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"{config_path}: field {key!r} should be an integer, found {value!r}")
    return value


def _float_field(config_path: Path, cfg: dict[str, Any], key: str, default: float) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"{config_path}: field {key!r} should be a number, found {value!r}")
    return float(value)


def _check_supported_features(config_path: Path, cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"{config_path}: hidden_act {act!r} is not supported; supported: silu")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UnsupportedArchitectureError(
                f"{config_path}: {key}=true is not supported (edgellm's Llama has no bias tensors)"
            )


def _model_config(config_path: Path, cfg: dict[str, Any], hf_arch: str, has_lm_head: bool) -> ModelConfig:
    _check_supported_features(config_path, cfg)
    ints = {field: _int_field(config_path, cfg, key) for field, key in REQUIRED_INT_KEYS.items()}
    ints["context_length"] = _context_length(config_path, cfg, ints["context_length"])
    rope = _rope_parameters(cfg)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:  # absent: transformers defaults to untied, but a file without lm_head is tied
        tie = not has_lm_head
    try:
        return ModelConfig(
            architecture=SUPPORTED_ARCHITECTURES[hf_arch],
            **ints,
            n_kv_heads=_int_field(config_path, cfg, "num_key_value_heads", default=ints["n_heads"]),
            head_dim=_int_field(config_path, cfg, "head_dim", default=0),
            rope_theta=_float_field(config_path, rope, "rope_theta", DEFAULT_ROPE_THETA),
            rope_style="half",
            rope_scaling=_rope_scaling(config_path, rope),
            norm_eps=_float_field(config_path, cfg, "rms_norm_eps", DEFAULT_RMS_NORM_EPS),
            tie_embeddings=bool(tie),
            name=str(cfg.get("_name_or_path") or config_path.parent.name),
        )
    except ConfigError as exc:
        raise ModelFormatError(f"{config_path}: {exc}") from None


def _context_length(config_path: Path, cfg: dict[str, Any], max_positions: int) -> int:
    window = cfg.get("sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < max_positions:
        # Attention within the window equals full attention; edgellm has no sliding-window kernel.
        log.warning("%s: sliding_window %d < max_position_embeddings %d; context capped at %d",
                    config_path, window, max_positions, window)
        return window
    return max_positions


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """One dict with rope_theta and the scaling keys: transformers >= 5 writes `rope_parameters`,
    older versions write `rope_theta` and `rope_scaling` at the top level."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        return params
    legacy = dict(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        legacy["rope_theta"] = cfg["rope_theta"]
    return legacy


def _rope_scaling(config_path: Path, rope: dict[str, Any]) -> RopeScaling:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{config_path}: rope scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    kind = ROPE_TYPES[rope_type]
    if kind == "none":
        return RopeScaling()
    if kind == "llama3" and not rope.get("original_max_position_embeddings"):
        raise ModelFormatError(f"{config_path}: llama3 rope scaling needs original_max_position_embeddings")
    return RopeScaling(
        kind=kind,  # type: ignore[arg-type]
        factor=_float_field(config_path, rope, "factor", 1.0),
        original_context=int(rope.get("original_max_position_embeddings") or 0),
        low_freq_factor=_float_field(config_path, rope, "low_freq_factor", 1.0),
        high_freq_factor=_float_field(config_path, rope, "high_freq_factor", 4.0),
    )


def llama3_freq_factors(config: ModelConfig) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE scaling, shaped (head_dim / 2,).

    The same numbers llama.cpp's converter stores as `rope_freqs.weight`, which the reference model
    divides its inverse frequencies by: 1 for short wavelengths, `factor` for long ones, a smooth blend
    in between (transformers' `_compute_llama3_parameters`).
    """
    s = config.rope_scaling
    if s.original_context <= 0 or s.high_freq_factor <= s.low_freq_factor:
        raise ConfigError(
            f"llama3 rope scaling needs original_context > 0 and high_freq_factor > low_freq_factor; "
            f"found {s.original_context}, {s.high_freq_factor}, {s.low_freq_factor}"
        )
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    factors = 1.0 / ((1 - smooth) / s.factor + smooth)
    factors = np.where(wavelen < s.original_context / s.high_freq_factor, 1.0, factors)
    factors = np.where(wavelen > s.original_context / s.low_freq_factor, s.factor, factors)
    return factors.astype(np.float32)


# --- safetensors -> WeightTensor -------------------------------------------------------------------


def canonical_names(n_layers: int) -> dict[str, str]:
    """Hugging Face tensor name -> canonical (GGUF) name, for a model with `n_layers` blocks."""
    names = {hf: canonical for canonical, hf in GLOBAL_TENSORS.items()}
    for i in range(n_layers):
        names.update({hf.format(i=i): canonical.format(i=i) for canonical, hf in LAYER_TENSORS.items()})
    return names


def _stored_tensor_count(file: Path) -> int:
    """Tensors in a safetensors header (8-byte little-endian length, then JSON); a damaged header
    counts as unbounded here and is reported by the full reader."""
    try:
        with file.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if size > file.stat().st_size:
                return 1 << 62
            header = json.loads(fh.read(size))
        return len([k for k in header if k != "__metadata__"])
    except (OSError, ValueError):
        return 1 << 62


def _weight_files(path: Path) -> dict[Path, list[str] | None]:
    """Safetensors files -> the tensor names the index places there (None: single file, take all)."""
    if (path / WEIGHTS_FILE).is_file():
        return {path / WEIGHTS_FILE: None}
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        others = sorted(p.name for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".pth"))
        raise ModelFormatError(
            f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} is present"
            f" (found: {', '.join(others) or 'no weight files'}); edgellm reads safetensors weights"
        )
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index_path}: field 'weight_map' is missing or empty")
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        shard_path = path / str(shard)
        if not shard_path.is_file():
            raise ModelFormatError(f"{index_path}: tensor {name!r} is in shard {shard!r}, which is missing")
        shards.setdefault(shard_path, []).append(name)
    return {file: names for file, names in shards.items()}


def _read_weights(path: Path, cfg: dict[str, Any]) -> tuple[dict[str, WeightTensor], Counter]:
    n_layers = _int_field(path / CONFIG_FILE, cfg, "num_hidden_layers")
    files = _weight_files(path)
    n_stored = sum(len(names) if names is not None else _stored_tensor_count(file) for file, names in files.items())
    if n_layers > n_stored:  # checked before building a name table that a corrupt count could make huge
        raise MissingTensorError(
            f"{path / CONFIG_FILE}: num_hidden_layers is {n_layers} but the checkpoint holds only {n_stored} tensors"
        )
    wanted = canonical_names(n_layers)
    tensors: dict[str, WeightTensor] = {}
    counts: Counter = Counter()
    for file, names in files.items():
        header, data = _open_safetensors(file)
        for hf in names if names is not None else list(header):
            if hf not in wanted:
                continue  # e.g. rotary_emb.inv_freq buffers of old checkpoints
            if hf not in header:
                raise ModelFormatError(f"{file}: tensor {hf!r} is listed in {INDEX_FILE} but absent from the shard")
            tensor = _weight_tensor(file, wanted[hf], hf, header[hf], data)
            tensors[tensor.name] = tensor
            counts[tensor.qtype] += int(np.prod(tensor.shape))
    return tensors, counts


def _open_safetensors(file: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Validate `file` with the safetensors library; return its header and a read-only byte map."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np"):
            pass
    except SafetensorError as exc:
        raise ModelFormatError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
    with file.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
    return header, data


def _weight_tensor(file: Path, name: str, hf: str, entry: dict[str, Any], data: np.ndarray) -> WeightTensor:
    dtype = entry["dtype"]
    if dtype not in SAFETENSORS_DTYPES:
        raise UnsupportedTensorTypeError(
            f"{file}: tensor {hf!r} has dtype {dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}"
        )
    qtype, storage = SAFETENSORS_DTYPES[dtype]
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = entry["data_offsets"]
    raw = data[begin:end].view(storage).reshape(shape)
    return WeightTensor(name=name, shape=shape, qtype=qtype, raw=raw, _dequantize=_to_float32(raw, qtype))


def _to_float32(raw: np.ndarray, qtype: str) -> Callable[[], np.ndarray]:
    if qtype == "BF16":  # bf16 is the top half of a float32
        return lambda: (raw.astype(np.uint32) << 16).view(np.float32)
    return lambda: np.asarray(raw, dtype=np.float32)


# --- tokenizer files -> TokenizerSpec ---------------------------------------------------------------


def _tokenizer(path: Path, cfg: dict[str, Any], vocab_size: int) -> TokenizerSpec | None:
    tok_path = path / TOKENIZER_FILE
    if not tok_path.is_file():
        return None
    hf_json = _read_text(tok_path)
    hf_tok = _read_json(tok_path, hf_json)
    tok_cfg = _optional_json(path / TOKENIZER_CONFIG_FILE)
    gen_cfg = _optional_json(path / GENERATION_CONFIG_FILE)
    tokens, types = _vocabulary(tok_path, hf_tok, vocab_size)
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        for source in (cfg, gen_cfg):
            value = source.get(f"{key}_token_id")
            if value is not None:
                value = value[0] if isinstance(value, list) and value else value
                if type(value) is not int:
                    raise ModelFormatError(f"{path}: {key}_token_id should be an integer, found {value!r}")
                return value
        content = _token_content(tok_cfg.get(f"{key}_token"))
        return ids.get(content) if content is not None else None

    bos_id, eos_id = special_id("bos"), special_id("eos")
    all_eos = [i for source in (cfg, gen_cfg) for i in _id_list(source.get("eos_token_id"))]
    return TokenizerSpec(
        model="gpt2",
        pre="default",
        tokens=tuple(tokens),
        token_types=tuple(types),
        merges=(),  # tokenizer.json is used as-is
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=special_id("unk"),
        pad_id=special_id("pad"),
        add_bos=_adds_token(tok_cfg, hf_tok, "add_bos_token", bos_id, first=True),
        add_eos=_adds_token(tok_cfg, hf_tok, "add_eos_token", eos_id, first=False),
        chat_template=_chat_template(path, tok_cfg),
        extra_eos_ids=tuple(dict.fromkeys(i for i in all_eos if i != eos_id)),
        hf_json=hf_json,
    )


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _vocabulary(tok_path: Path, hf_tok: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with llama.cpp token types, padded with unused entries to `vocab_size`."""
    vocab = (hf_tok.get("model") or {}).get("vocab")
    by_id: dict[int, tuple[str, int]] = {}
    if isinstance(vocab, dict):  # BPE, WordPiece: token -> id
        by_id.update({int(i): (t, TOKEN_NORMAL) for t, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [token, score] in id order
        by_id.update({i: (str(entry[0]), TOKEN_NORMAL) for i, entry in enumerate(vocab)})
    else:
        raise ModelFormatError(f"{tok_path}: field 'model.vocab' is missing or not a map/list")
    for added in hf_tok.get("added_tokens") or []:
        kind = TOKEN_CONTROL if added.get("special") else TOKEN_NORMAL
        by_id[int(added["id"])] = (str(added["content"]), kind)
    size = max(vocab_size, max(by_id, default=-1) + 1)
    # ids the files leave out become "[PAD{i}]" of type unused, as llama.cpp's converter writes them
    entries = [by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED)) for i in range(size)]
    return [t for t, _ in entries], [k for _, k in entries]


def _adds_token(tok_cfg: dict[str, Any], hf_tok: dict[str, Any], key: str, token_id: int | None,
                first: bool) -> bool:
    """tokenizer_config's add_bos/eos flag, else whether tokenizer.json's template inserts the token."""
    if isinstance(tok_cfg.get(key), bool):
        return tok_cfg[key]
    if token_id is None:
        return False
    for proc in _processors(hf_tok.get("post_processor")):
        single = proc.get("single") or []
        if proc.get("type") != "TemplateProcessing" or not single:
            continue
        item = (single[0] if first else single[-1]).get("SpecialToken")
        if item is not None:
            special = (proc.get("special_tokens") or {}).get(item.get("id"), {})
            return token_id in special.get("ids", [])
    return False


def _processors(proc: Any) -> list[dict[str, Any]]:
    if not isinstance(proc, dict):
        return []
    if proc.get("type") == "Sequence":
        return [p for p in proc.get("processors") or [] if isinstance(p, dict)]
    return [proc]


def _chat_template(path: Path, tok_cfg: dict[str, Any]) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if isinstance(template, str):
        return template
    jinja = path / CHAT_TEMPLATE_FILE
    return _read_text(jinja) if jinja.is_file() else None
