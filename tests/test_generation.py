"""Sampling against numpy-computed distributions; streaming, stop strings and EOS on the real model."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.errors import ConfigError, ContextOverflowError
from edgellm.runtime.generation import GenerationConfig, generate
from edgellm.runtime.sampling import Sampler, SamplingConfig

LOGITS = np.log(np.array([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))


def draw(config: SamplingConfig, n: int = 4000, history=()) -> np.ndarray:
    sampler = Sampler(config)
    return np.bincount([sampler(LOGITS, history) for _ in range(n)], minlength=LOGITS.size) / n


def within_sampling_error(freq: np.ndarray, expected: np.ndarray, n: int = 4000) -> bool:
    sigma = np.sqrt(expected * (1 - expected) / n) + 1e-9
    return bool(np.all(np.abs(freq - expected) <= 4 * sigma + 1e-3))


def test_greedy_is_argmax_and_ignores_seed():
    assert Sampler(SamplingConfig(greedy=True, seed=1))(LOGITS) == 0
    assert Sampler(SamplingConfig(temperature=0.0))(LOGITS) == 0


def test_plain_sampling_follows_softmax():
    freq = draw(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, seed=0))
    assert within_sampling_error(freq, np.exp(LOGITS) / np.exp(LOGITS).sum()), freq


def test_temperature_sharpens_as_numpy_says():
    p = np.exp(LOGITS / 0.5)
    freq = draw(SamplingConfig(temperature=0.5, top_k=0, top_p=1.0, seed=1))
    assert within_sampling_error(freq, p / p.sum()), freq


def test_top_k_keeps_exactly_k_renormalised():
    p = np.exp(LOGITS)
    p[3:] = 0
    freq = draw(SamplingConfig(temperature=1.0, top_k=3, top_p=1.0, seed=2))
    assert freq[3:].sum() == 0
    assert within_sampling_error(freq, p / p.sum()), freq


def test_top_p_keeps_the_smallest_nucleus():
    # cumulative 0.40, 0.65, 0.80 -> top_p 0.7 keeps the first three tokens
    p = np.exp(LOGITS)
    p[3:] = 0
    freq = draw(SamplingConfig(temperature=1.0, top_k=0, top_p=0.7, seed=3))
    assert freq[3:].sum() == 0
    assert within_sampling_error(freq, p / p.sum()), freq


def test_repetition_penalty_demotes_seen_tokens():
    sampler = Sampler(SamplingConfig(greedy=True, repetition_penalty=2.0))
    logits = np.array([3.0, 2.0, -1.0])
    assert sampler(logits, history=[0]) == 1  # 3.0 / 2 = 1.5 < 2.0


def test_seed_makes_sampling_reproducible():
    a = draw(SamplingConfig(seed=42), n=200)
    b = draw(SamplingConfig(seed=42), n=200)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)])
def test_bad_sampling_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        SamplingConfig(**bad)


def greedy(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(greedy=True), **kw)


def test_stream_text_concatenates_to_decoded_tokens(reference, tokenizer):
    events = list(generate(reference.open_session(max_tokens=128), tokenizer,
                           tokenizer.encode("Write a haiku about the sea:"), greedy(40, stop_at_eos=False)))
    assert len(events) == 40 and events[-1].finish_reason == "length"
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == tokenizer.decode(ids)


def test_stop_string_cuts_the_text(reference, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    full = list(generate(reference.open_session(max_tokens=64), tokenizer, prompt, greedy(20, stop_at_eos=False)))
    text = "".join(e.text for e in full)
    assert "." in text
    events = list(generate(reference.open_session(max_tokens=64), tokenizer, prompt, greedy(20, stop=(".",))))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == text[: text.index(".")]


def test_chat_reply_ends_at_eos(reference, tokenizer, model):
    from edgellm.model.chat import render_chat

    ids = tokenizer.encode(render_chat(model.tokenizer, [{"role": "user", "content": "What is 2+2?"}]),
                           parse_special=True)
    events = list(generate(reference.open_session(max_tokens=256), tokenizer, ids, greedy(100)))
    assert events[-1].finish_reason == "eos" and events[-1].token_id in tokenizer.eos_ids
    assert "4" in "".join(e.text for e in events)


def test_seeded_sampling_reproducible_on_the_model(reference, tokenizer):
    cfg = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=0.9, seed=7))
    prompt = tokenizer.encode("My favourite food is")
    runs = [[e.token_id for e in generate(reference.open_session(max_tokens=64), tokenizer, prompt, cfg)]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_prompt_longer_than_context_is_refused(reference, tokenizer):
    with pytest.raises(ContextOverflowError, match="does not fit"):
        list(generate(reference.open_session(max_tokens=8), tokenizer, list(range(100, 120)), greedy(4)))


def test_llamacpp_streams_through_the_same_api(llamacpp, tokenizer):
    events = list(generate(llamacpp.open_session(max_tokens=64), tokenizer,
                           tokenizer.encode("The capital of France is"), greedy(8, stop_at_eos=False)))
    assert "Paris" in "".join(e.text for e in events)


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(temperature=float("nan")), dict(top_p=float("inf"))])
def test_non_finite_or_negative_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        SamplingConfig(**bad)


def test_token_ids_outside_the_vocabulary_are_refused(reference, llamacpp):
    for backend in (reference, llamacpp):
        with pytest.raises(ConfigError, match=r"token id 49152 is outside the vocabulary \[0, 49152\)"):
            backend.open_session(max_tokens=8).forward(np.array([1, 49152]))
        with pytest.raises(ConfigError, match="token id -1"):
            backend.open_session(max_tokens=8).forward(np.array([-1]))
