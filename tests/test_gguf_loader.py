"""GGUF loader: tiny seeded files written by gguf's own writer, malformed variants, the real default model.

Oracles from outside: `gguf.GGUFWriter` writes the files, `gguf.GGUFReader` parses them independently,
`gguf.quants.dequantize` gives the float values of stored blocks.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgellm.errors import (
    EdgeLLMError,
    MissingTensorError,
    ModelFormatError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from edgellm.model.description import ModelDescription
from edgellm.model.gguf_loader import load_gguf, parse_header
from edgellm.model.loader import load_model
from edgellm.model.tensor_names import expected_shapes
from edgellm.model.tokenizer import Tokenizer
from tests.tiny_gguf import BLOCK_QTYPES, SUPPORTED_QTYPES, tiny_tensors, tiny_vocab, write_tiny_gguf

V = gguf.GGUFValueType


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _exactly(exc_info: pytest.ExceptionInfo, cls: type) -> None:
    """pytest.raises accepts subclasses; these checks want the precise class."""
    assert type(exc_info.value) is cls, f"expected {cls.__name__}, got {type(exc_info.value).__name__}"


def _reader_fields(path: Path) -> dict[str, object]:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def _assert_header_matches_gguf_reader(path: Path, desc: ModelDescription) -> None:
    """Our header parse and tensor views agree with llama.cpp's PyPI reader, value for value."""
    reader = gguf.GGUFReader(path)
    ours = parse_header(path)
    theirs = {name: field.contents() for name, field in reader.fields.items()}
    assert list(ours.fields) == list(theirs), set(ours.fields) ^ set(theirs)
    for key, value in theirs.items():
        assert type(ours.fields[key]) is type(value), key
        assert ours.fields[key] == value, key
    assert ours.data_start == reader.data_offset
    assert [t.name for t in reader.tensors] == list(desc.weights)
    for t in reader.tensors:
        raw = desc.weights[t.name].raw
        assert raw.dtype == t.data.dtype and raw.shape == t.data.shape, t.name
        assert raw.tobytes() == t.data.tobytes(), t.name


# ------------------------------------------------------------------------------------- valid tiny files


def test_tiny_config_fields(tiny_path: Path) -> None:
    desc = load_gguf(tiny_path)
    c = desc.config
    assert (c.architecture, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads) == ("llama", 2, 64, 4, 2)
    assert (c.ffn_size, c.vocab_size, c.context_length, c.head_dim) == (128, len(tiny_vocab().tokens), 256, 16)
    assert c.rope_theta == 10000.0
    assert c.norm_eps == pytest.approx(1e-5, rel=1e-6)  # stored as float32
    assert c.tie_embeddings and desc.lm_head_name() == "token_embd.weight"
    assert c.name == "tiny-llama-test"
    assert desc.source == tiny_path
    assert desc.file_type == "F32"
    assert desc.metadata["llama.block_count"] == 2
    assert not any(k.startswith("tokenizer.ggml.") for k in desc.metadata)


@pytest.mark.parametrize("qtype", SUPPORTED_QTYPES)
def test_tiny_tensors_shapes_raw_and_float(tmp_path: Path, qtype: str) -> None:
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    written = tiny_tensors(qtype=qtype)
    desc = load_gguf(path)
    assert desc.file_type == qtype
    expected = expected_shapes(desc.config)
    assert set(desc.weights) == set(expected) == set(written)
    for name, t in written.items():
        w = desc.weights[name]
        assert w.shape == expected[name] == t.values.shape, name
        assert w.qtype == t.qtype, name
        assert w.raw.tobytes() == t.stored.tobytes(), f"{name}: raw blocks differ from what was written"
        gtype = gguf.GGMLQuantizationType[t.qtype]
        reference = gguf.quants.dequantize(t.stored, gtype).astype(np.float32).reshape(t.values.shape)
        got = desc.weights.float(name)
        assert got.dtype == np.float32 and got.shape == t.values.shape
        diff = np.abs(got - reference)
        assert np.array_equal(got, reference), f"{name}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"
        if t.qtype == "F32":
            assert np.array_equal(got, t.values), name
        else:  # quantized values are near the originals (a coarse guard against reading the wrong blocks)
            rel = np.linalg.norm(got - t.values) / np.linalg.norm(t.values)
            assert rel < (0.01 if t.qtype in ("F16", "Q8_0") else 0.2), f"{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("qtype", BLOCK_QTYPES)
def test_mixed_types_like_real_files(tmp_path: Path, qtype: str) -> None:
    """Quantized linears with a Q8_0 embedding (the default model's layout): file_type is the majority."""
    path = write_tiny_gguf(tmp_path / "mixed.gguf", qtype=qtype, embd_qtype="Q8_0", vocab=300)
    desc = load_gguf(path)
    assert desc.weights["token_embd.weight"].qtype == "Q8_0"
    assert desc.weights["blk.1.ffn_up.weight"].qtype == qtype
    assert desc.weights["output_norm.weight"].qtype == "F32"
    assert desc.file_type == qtype
    assert desc.config.vocab_size == 300


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_header_parse_matches_gguf_reader(tmp_path: Path, qtype: str) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=qtype)
    _assert_header_matches_gguf_reader(path, load_gguf(path))


def test_custom_alignment_still_loads(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "aligned.gguf", alignment=256)
    desc = load_gguf(path)
    assert parse_header(path).alignment == 256
    _assert_header_matches_gguf_reader(path, desc)
    assert np.array_equal(desc.weights.float("blk.0.attn_q.weight"), tiny_tensors()["blk.0.attn_q.weight"].values)


def test_without_tokenizer_still_loads(tmp_path: Path) -> None:
    desc = load_gguf(write_tiny_gguf(tmp_path / "notok.gguf", with_tokenizer=False, vocab=300))
    assert desc.tokenizer is None
    assert desc.config.vocab_size == 300


def test_load_model_dispatches_to_gguf(tiny_path: Path, tmp_path: Path) -> None:
    desc = load_model(tiny_path)
    assert isinstance(desc, ModelDescription) and desc.source == tiny_path
    assert desc.config.n_layers == 2
    renamed = tmp_path / "model.bin"  # no .gguf suffix: recognised by its magic
    renamed.write_bytes(tiny_path.read_bytes())
    assert load_model(renamed).config.hidden_size == 64
    assert load_model(str(tiny_path)).config.vocab_size == len(tiny_vocab().tokens)


def test_tokenizer_round_trips(tiny_path: Path) -> None:
    spec = load_gguf(tiny_path).tokenizer
    voc = tiny_vocab()
    assert spec is not None
    assert list(spec.tokens) == voc.tokens and list(spec.token_types) == voc.token_types
    assert list(spec.merges) == voc.merges
    assert (spec.model, spec.pre, spec.bos_id, spec.eos_id) == ("gpt2", "gpt2", voc.bos_id, voc.eos_id)
    tok = Tokenizer(spec)
    for text in ["hello the world", "Héllo, wörld! 12345\n\ttabs  and  spaces", "emoji 🙂 and 中文", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("hello the") == [voc.tokens.index("hell"), voc.tokens.index("o"), voc.tokens.index("Ġthe")]
    end = voc.tokens.index("<|im_end|>")
    assert tok.encode("hi<|im_end|>", parse_special=True)[-1] == end
    assert end not in tok.encode("hi<|im_end|>")  # plain text unless parse_special
    assert tok.is_control(end) and tok.eos_ids == {voc.eos_id}


# -------------------------------------------------------------------------------------- malformed files


def test_wrong_magic(tiny_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + tiny_path.read_bytes()[4:])
    with pytest.raises(ModelFormatError, match=r"wrong magic.*b'GGML'") as exc:
        load_gguf(bad)
    _exactly(exc, ModelFormatError)
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    with pytest.raises(ModelFormatError, match="magic"):
        load_model(text)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty") as exc:
        load_gguf(empty)
    _exactly(exc, ModelFormatError)
    with pytest.raises(ModelFormatError, match="empty"):
        load_model(empty)


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no such model file") as exc:
        load_gguf(tmp_path / "missing.gguf")
    _exactly(exc, ModelFormatError)
    with pytest.raises(ModelFormatError, match="no such model file"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelFormatError, match="not a regular file"):
        load_gguf(tmp_path)


def _cut_points(path: Path) -> dict[str, int]:
    """Offsets to cut a valid file at, located with gguf's own reader."""
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    tensors = {t.name: t for t in reader.tensors}
    last = reader.tensors[-1]
    return {
        "inside the version": 6,
        "inside the counts": 20,
        "inside the first key": reader.fields["general.architecture"].offset + 10,
        "inside the token array": tokens.offset + 2000,
        "inside the merges": reader.fields["tokenizer.ggml.merges"].offset + 40,
        "inside a tensor index entry": tensors["blk.1.attn_q.weight"].field.offset + 9,
        "at the end of the header": reader.data_offset,
        "inside tensor data": tensors["blk.0.ffn_up.weight"].data_offset + 100,
        "one byte short": last.data_offset + last.n_bytes - 1,
    }


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
def test_truncated_file(tiny_path: Path, tmp_path: Path, qtype: str) -> None:
    path = tiny_path if qtype == "F32" else write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype=qtype)
    data = path.read_bytes()
    for where, cut in _cut_points(path).items():
        assert 4 < cut < len(data), where
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=r"truncated|corrupt") as exc:
            load_gguf(bad)
        assert type(exc.value) is ModelFormatError, f"cut {where}: {type(exc.value).__name__}: {exc.value}"


def test_damaged_headers_raise_edgellm_errors(tmp_path: Path) -> None:
    """Seeded damage anywhere in the header (lengths, counts, type ids, dims, offsets) plus a random cut:
    the loader either loads or raises an EdgeLLMError, never an IndexError/ValueError/MemoryError."""
    import random

    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0", n_layers=1)
    data = path.read_bytes()
    header_end = gguf.GGUFReader(path).data_offset
    rng = random.Random(1234)
    bad = tmp_path / "damaged.gguf"
    outcomes: dict[str, int] = {}
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            fmt = rng.choice(["<Q", "<I", "<B"])
            bits = 8 * struct.calcsize(fmt)
            value = rng.choice([0, 1, 2**31, 2**63, 2**64 - 1, rng.getrandbits(64)]) % 2**bits
            struct.pack_into(fmt, damaged, rng.randrange(4, header_end - 8), value)
        bad.write_bytes(bytes(damaged[: rng.choice([len(damaged), rng.randrange(4, len(damaged))])]))
        try:
            load_gguf(bad)
            outcome = "loaded"
        except EdgeLLMError as exc:
            outcome = type(exc).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("ModelFormatError", 0) > 100, outcomes


def _patch(path: Path, out: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    out.write_bytes(bytes(data))
    return out


def _tensor_info_offsets(path: Path, name: str) -> tuple[int, int]:
    """File offsets of a tensor's type id and data offset fields in the tensor index."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    type_at = t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)
    return type_at, type_at + 4


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "pattern"),
    [
        (4, "<I", 7, "GGUF version 7 is not supported"),
        (4, "<I", 3 << 24, "big-endian"),
        (8, "<Q", 10**9, "truncated or corrupt.*1000000000 tensors"),
        (16, "<Q", 2**40, "truncated or corrupt"),
        (24, "<Q", 2**62, "truncated: key of metadata field #0 at offset 32 needs"),  # length past the end
    ],
)
def test_corrupt_header_fields(tiny_path: Path, tmp_path: Path, offset: int, fmt: str, value: int,
                               pattern: str) -> None:
    bad = _patch(tiny_path, tmp_path / "bad.gguf", offset, fmt, value)
    with pytest.raises(ModelFormatError, match=pattern) as exc:
        load_gguf(bad)
    _exactly(exc, ModelFormatError)


def test_corrupt_value_type(tiny_path: Path, tmp_path: Path) -> None:
    field = gguf.GGUFReader(tiny_path).fields["general.architecture"]
    type_at = field.offset + 8 + len(b"general.architecture")
    bad = _patch(tiny_path, tmp_path / "bad.gguf", type_at, "<I", 99)
    with pytest.raises(ModelFormatError, match=r"corrupt.*'general.architecture' has unknown value type 99"):
        load_gguf(bad)


def test_corrupt_tensor_offset(tiny_path: Path, tmp_path: Path) -> None:
    _, offset_at = _tensor_info_offsets(tiny_path, "blk.0.attn_k.weight")
    misaligned = _patch(tiny_path, tmp_path / "misaligned.gguf", offset_at, "<Q", 33)
    with pytest.raises(ModelFormatError, match=r"blk.0.attn_k.weight data offset 33 .*alignment 32"):
        load_gguf(misaligned)
    beyond = _patch(tiny_path, tmp_path / "beyond.gguf", offset_at, "<Q", 2**40)
    with pytest.raises(ModelFormatError, match=r"truncated: tensor blk.0.attn_k.weight needs bytes"):
        load_gguf(beyond)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(UnsupportedArchitectureError, match=r"'qwen2' is not supported; supported: llama") as exc:
        load_gguf(path)
    _exactly(exc, UnsupportedArchitectureError)
    path = write_tiny_gguf(tmp_path / "noarch.gguf", drop_metadata=["general.architecture"])
    with pytest.raises(UnsupportedArchitectureError, match=r"\(missing\) is not supported; supported: llama"):
        load_gguf(path)


@pytest.mark.parametrize("name", ["blk.1.ffn_down.weight", "output_norm.weight", "token_embd.weight"])
def test_missing_tensor(tmp_path: Path, name: str) -> None:
    path = write_tiny_gguf(tmp_path / "missing.gguf", drop_tensors=[name])
    with pytest.raises(MissingTensorError, match=rf"1 required tensor\(s\) missing, e.g. {name}") as exc:
        load_gguf(path)
    _exactly(exc, MissingTensorError)


def test_block_count_beyond_tensors(tmp_path: Path) -> None:
    """A corrupt count of 4e9 layers fails at once (not after listing 36e9 expected tensor names)."""
    path = write_tiny_gguf(tmp_path / "layers.gguf", extra_metadata={"llama.block_count": (2**32 - 1, V.UINT32)})
    with pytest.raises(MissingTensorError, match=r"says 4294967295 layers .* tensors for 2; e.g. no tensors for blk.2"):
        load_gguf(path)
    path = write_tiny_gguf(tmp_path / "three.gguf", extra_metadata={"llama.block_count": (3, V.UINT32)})
    with pytest.raises(MissingTensorError, match=r"blk.2"):
        load_gguf(path)


def test_shape_mismatch(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "shape.gguf", bad_shapes={"blk.0.attn_k.weight": (48, 64)})
    with pytest.raises(TensorShapeError, match=r"blk.0.attn_k.weight: expected \(32, 64\), found \(48, 64\)") as exc:
        load_gguf(path)
    _exactly(exc, TensorShapeError)
    # the vocabulary size in the metadata disagrees with the embedding's rows
    path = write_tiny_gguf(tmp_path / "vocab.gguf", extra_metadata={"llama.vocab_size": (500, V.UINT32)})
    with pytest.raises(TensorShapeError, match=r"token_embd.weight: expected \(500, 64\), found \(267, 64\)"):
        load_gguf(path)


@pytest.mark.parametrize(
    "key",
    [
        "llama.block_count",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.context_length",
    ],
)
def test_missing_required_metadata(tmp_path: Path, key: str) -> None:
    path = write_tiny_gguf(tmp_path / "nometa.gguf", drop_metadata=[key])
    with pytest.raises(ModelFormatError, match=rf"metadata field '{key}' is missing") as exc:
        load_gguf(path)
    _exactly(exc, ModelFormatError)


def test_missing_vocab_size_and_tokens(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "novocab.gguf", with_tokenizer=False, drop_metadata=["llama.vocab_size"])
    with pytest.raises(ModelFormatError, match=r"neither llama.vocab_size nor tokenizer.ggml.tokens"):
        load_gguf(path)
    # with a token list the vocabulary size is its length
    desc = load_gguf(write_tiny_gguf(tmp_path / "tokvocab.gguf", drop_metadata=["llama.vocab_size"]))
    assert desc.config.vocab_size == len(tiny_vocab().tokens)


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"llama.block_count": ("two", V.STRING)}, r"'llama.block_count' should be int, found 'two'"),
        ({"llama.attention.head_count": (3, V.UINT32)}, r"invalid model hyper-parameters.*n_heads 3"),
        ({"llama.context_length": (0, V.UINT32)}, r"invalid model hyper-parameters.*context_length"),
        ({"tokenizer.ggml.token_type": ([1, 1, 1], V.ARRAY)}, r"token_type' should hold 267 integers.*3 entries"),
        ({"tokenizer.ggml.eos_token_id": (9999, V.UINT32)}, r"eos_token_id' = 9999 is outside the vocabulary"),
        ({"tokenizer.ggml.merges": ([1, 2], V.ARRAY)}, r"'tokenizer.ggml.merges' should be an array of strings"),
    ],
)
def test_bad_metadata_values(tmp_path: Path, extra: dict, pattern: str) -> None:
    path = write_tiny_gguf(tmp_path / "badmeta.gguf", extra_metadata=extra)
    with pytest.raises(ModelFormatError, match=pattern) as exc:
        load_gguf(path)
    _exactly(exc, ModelFormatError)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    # Q8_1 is a real GGML block type gguf can write (as raw blocks) but cannot dequantize.
    with pytest.raises(NotImplementedError):
        gguf.quants.dequantize(np.zeros(36, dtype=np.uint8), gguf.GGMLQuantizationType.Q8_1)
    path = write_tiny_gguf(tmp_path / "q81.gguf", tensor_qtypes={"blk.0.attn_q.weight": "Q8_1"})
    with pytest.raises(UnsupportedTensorTypeError, match=r"blk.0.attn_q.weight has type Q8_1") as exc:
        load_gguf(path)
    _exactly(exc, UnsupportedTensorTypeError)


def test_unknown_tensor_type_id(tiny_path: Path, tmp_path: Path) -> None:
    type_at, _ = _tensor_info_offsets(tiny_path, "blk.1.ffn_gate.weight")
    bad = _patch(tiny_path, tmp_path / "bad.gguf", type_at, "<I", 200)
    with pytest.raises(UnsupportedTensorTypeError, match=r"blk.1.ffn_gate.weight has GGML type id 200"):
        load_gguf(bad)


# ------------------------------------------------------------------------------ the real default model


@pytest.fixture(scope="module")
def default_model() -> ModelDescription:
    return load_model()  # scripts/setup.sh installs it; a missing model must fail, not skip


def test_default_model_facts(default_model: ModelDescription) -> None:
    from edgellm.model.catalog import DEFAULT_MODEL_ID, cards

    c = default_model.config
    assert c.architecture == "llama"
    assert (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads) == (30, 576, 9, 3)
    assert (c.ffn_size, c.vocab_size, c.context_length, c.head_dim) == (1536, 49152, 8192, 64)
    assert c.tie_embeddings
    assert default_model.file_type == "Q4_1"
    w = default_model.weights
    assert w["token_embd.weight"].qtype == "Q8_0"
    assert w["token_embd.weight"].shape == (49152, 576)
    assert w["blk.29.ffn_down.weight"].qtype == "Q4_1" and w["blk.29.ffn_down.weight"].shape == (576, 1536)
    assert w["output_norm.weight"].qtype == "F32"
    assert len(w) == 2 + 9 * 30
    facts = cards()[DEFAULT_MODEL_ID].facts
    for key in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "ffn_size", "vocab_size", "context_length"):
        assert getattr(c, key) == facts[key], key
    tok = default_model.tokenizer
    assert tok is not None and len(tok.tokens) == 49152 and tok.pre == "smollm"
    assert tok.tokens[tok.eos_id] == "<|im_end|>"


def test_default_model_dequantizes_like_gguf(default_model: ModelDescription) -> None:
    w = default_model.weights["blk.0.attn_q.weight"]
    reference = gguf.quants.dequantize(np.asarray(w.raw), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(w.to_float(), reference)
    w.release_float()


def test_default_model_header_matches_gguf_reader(default_model: ModelDescription) -> None:
    _assert_header_matches_gguf_reader(default_model.source, default_model)
