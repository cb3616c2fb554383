"""Tokenizer parity with llama.cpp (llama-cpp-python's tokenize on the same GGUF): 100 % equal ids."""

from __future__ import annotations

import pytest

from edgellm.corpus import canterbury_path
from edgellm.model.chat import render_chat
from tests.helpers import first_difference

NON_ASCII_LINES = [
    "Grüße aus München — naïve café, façade, coöperate.\n",
    "日本語のテキストと中文字符，还有한국어 문장도 있습니다。\n",
    "Emoji 🤖🚀 and flags 🇫🇷, ZWJ 👩‍💻, math ∑∫√ ≤ ≥ ≠.\n",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी.\n",
    "  leading spaces\tand\ttabs   trailing   \r\n",
    "Numbers 1234567890 3.14159 1e-9 -42 0x1F 1,000,000\n",
    "It's we're they've I'm you'll he'd 'quoted' \"double\"\n",
    "",
    "\n\n\n",
    "   ",
]


def corpus_lines(name: str) -> list[str]:
    text = canterbury_path(name).read_bytes().decode("utf-8")
    return text.splitlines(keepends=True)  # keeps CRLF, as the perplexity text does


@pytest.mark.parametrize("name", ["alice29.txt", "asyoulik.txt"])
def test_every_corpus_line_matches_llamacpp(name, tokenizer, llamacpp):
    lines = corpus_lines(name)
    mismatches = [ln for ln in lines if tokenizer.encode(ln) != llamacpp.tokenize(ln)]
    assert not mismatches, f"{len(mismatches)}/{len(lines)} lines differ, first: {mismatches[:3]!r}"
    assert len(lines) > 3000


def test_whole_file_matches_llamacpp(tokenizer, llamacpp, alice_text):
    ours = tokenizer.encode(alice_text)
    theirs = llamacpp.tokenize(alice_text)
    assert ours == theirs, f"first difference at {first_difference(ours, theirs)}"


@pytest.mark.parametrize("line", NON_ASCII_LINES)
def test_non_ascii_lines_match_llamacpp(line, tokenizer, llamacpp):
    assert tokenizer.encode(line) == llamacpp.tokenize(line)


def test_special_tokens_parsed_like_llamacpp(tokenizer, llamacpp, model):
    text = render_chat(model.tokenizer, [{"role": "user", "content": "Hi <b>there</b>!"}])
    ours = tokenizer.encode(text, parse_special=True)
    assert ours == llamacpp.tokenize(text, special=True)
    assert ours[0] == 1 and 2 in ours  # <|im_start|> and <|im_end|> became control tokens
    # Without parse_special the same text is ordinary characters, as llama.cpp's special=False.
    assert tokenizer.encode(text) == llamacpp.tokenize(text, special=False)


def test_decode_round_trips(tokenizer, alice_text):
    sample = alice_text[:5000] + "".join(NON_ASCII_LINES)
    assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_no_bos_added_because_the_gguf_says_so(tokenizer, model):
    assert model.tokenizer.add_bos is False
    assert tokenizer.encode("Hello")[0] != model.tokenizer.bos_id


def test_chat_template_renders_like_llama_cpp_python(model):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    spec = model.tokenizer
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    theirs = Jinja2ChatFormatter(
        template=spec.chat_template, eos_token=spec.tokens[spec.eos_id], bos_token=spec.tokens[spec.bos_id]
    )(messages=messages).prompt
    ours = render_chat(spec, messages)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n") and ours.endswith("<|im_start|>assistant\n")
