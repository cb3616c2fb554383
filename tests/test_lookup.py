"""Prompt-lookup drafting: guesses against a brute-force oracle; generation with drafting equals plain
generation token for token (greedy and seeded sampling, every stop reason) on the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.errors import ConfigError
from edgellm.runtime.generation import GenerationConfig, generate
from edgellm.runtime.lookup import LookupConfig, PromptLookup
from edgellm.runtime.sampling import SamplingConfig

# A prompt whose greedy continuation copies much of itself (measured: 18 passes for 40 tokens on the
# reference), so guesses are found and accepted.
REPEATING = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef"


def oracle(history: list[int], limit: int, cfg: LookupConfig) -> list[int]:
    """Scan for the latest earlier occurrence of the longest suffix, as the docstring defines it."""
    for n in range(min(cfg.max_ngram, len(history)), cfg.min_ngram - 1, -1):
        suffix = history[-n:]
        for s in range(len(history) - n - 1, -1, -1):
            if history[s:s + n] == suffix:
                return history[s + n:s + n + limit]
    return []


@pytest.mark.parametrize("cfg", [LookupConfig(), LookupConfig(max_draft=8, max_ngram=2, min_ngram=2)])
def test_guesses_equal_a_brute_force_scan(cfg):
    rng = np.random.default_rng(0)
    for trial in range(20):
        lookup, history = PromptLookup(cfg), []
        for _ in range(120):  # grow one to three tokens at a time, as decoding does
            history.extend(int(t) for t in rng.integers(0, 5 + trial % 3, size=rng.integers(1, 4)))
            limit = int(rng.integers(0, cfg.max_draft + 1))
            assert lookup.propose(history, limit) == oracle(history, limit, cfg), history


def test_bad_lookup_settings_are_refused():
    for bad in (dict(max_draft=0), dict(min_ngram=0), dict(min_ngram=3, max_ngram=2)):
        with pytest.raises(ConfigError):
            LookupConfig(**bad)


def run(session, tokenizer, prompt: str, cfg: GenerationConfig, counter: list[int] | None = None):
    ids = tokenizer.encode(prompt)
    if counter is not None:
        forward = session.forward

        def counted(inputs, all_logits=False):
            counter.append(len(inputs))
            return forward(inputs, all_logits)

        session.forward = counted
    events = list(generate(session, tokenizer, ids, cfg))
    return [e.token_id for e in events], events[-1].finish_reason, session.position


@pytest.mark.parametrize("sampling", [SamplingConfig(greedy=True),
                                      SamplingConfig(temperature=0.9, top_k=20, seed=11),
                                      SamplingConfig(greedy=True, repetition_penalty=1.3)])
def test_drafting_reproduces_plain_generation_on_the_reference(reference, tokenizer, sampling):
    """Same tokens, same finish reason, same cache length; fewer forward passes than tokens."""
    plain = GenerationConfig(max_new_tokens=40, sampling=sampling, stop_at_eos=False)
    drafted = GenerationConfig(max_new_tokens=40, sampling=sampling, stop_at_eos=False, lookup=LookupConfig())
    calls: list[int] = []
    expected = run(reference.open_session(max_tokens=128), tokenizer, REPEATING, plain)
    got = run(reference.open_session(max_tokens=128), tokenizer, REPEATING, drafted, calls)
    assert got == expected
    if sampling.is_greedy and sampling.repetition_penalty == 1.0:
        assert len(calls) - 1 < 40 * 0.75, calls  # the repetition is guessed: well under one pass per token


@pytest.mark.parametrize("cut", ["stop", "length_tokens", "length_context"])
def test_every_stop_reason_leaves_the_cache_as_plain_decoding_does(reference, tokenizer, cut):
    kw = dict(max_new_tokens=40, sampling=SamplingConfig(greedy=True), stop_at_eos=False)
    max_tokens = 128
    if cut == "stop":
        kw["stop"] = ("b + add",)
    elif cut == "length_tokens":
        kw["max_new_tokens"] = 13
    else:
        max_tokens = len(tokenizer.encode(REPEATING)) + 9
    plain = run(reference.open_session(max_tokens=max_tokens), tokenizer, REPEATING, GenerationConfig(**kw))
    drafted = run(reference.open_session(max_tokens=max_tokens), tokenizer, REPEATING,
                  GenerationConfig(**kw, lookup=LookupConfig(max_draft=6)))
    assert drafted == plain
    assert plain[1] == ("stop" if cut == "stop" else "length")


# int8-activation engines compute a position's logits slightly differently in a several-position pass
# than in a one-position pass (measured on ONNX Runtime: up to 1.0 on logits near 21-28): greedy choices
# between candidates closer than that may flip, as they do between any two engines.
NEAR_TIE = 1.0


def test_drafting_on_onnx_runtime_and_llamacpp_keeps_their_greedy_tokens(tokenizer, model, tmp_path):
    """Each engine against its own plain decode: the same tokens, or a first difference where the
    plain decode's two candidates were a near tie."""
    from edgellm.export.onnx_export import export_onnx
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    out = export_onnx(model, tmp_path / "onnx")
    engines = [create_backend("onnxruntime", load_model(out), threads=2),
               create_backend("llama.cpp", model, threads=2, logits_all=True)]
    n = 48
    plain = GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(greedy=True), stop_at_eos=False)
    drafted = GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(greedy=True), stop_at_eos=False,
                               lookup=LookupConfig())
    prompt = tokenizer.encode(REPEATING)
    for engine in engines:
        calls: list[int] = []
        expected, _, _ = run(engine.open_session(max_tokens=160), tokenizer, REPEATING, plain)
        got, reason, position = run(engine.open_session(max_tokens=160), tokenizer, REPEATING, drafted, calls)
        assert reason == "length" and position == len(prompt) + n - 1, engine.name
        assert len(calls) - 1 < n * 0.75, (engine.name, calls)
        if got != expected:
            i = next(j for j, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
            session = engine.open_session(max_tokens=160)  # the plain decode's logits: one position a pass
            logits = session.forward(np.asarray(prompt))[-1]
            for token in expected[:i]:
                logits = session.forward(np.asarray([token]))[-1]
            margin = logits[expected[i]] - logits[got[i]]
            assert 0 <= margin < NEAR_TIE, (engine.name, i, margin)


def test_cli_generate_with_lookup_prints_the_plain_text(tmp_path):
    from tests.test_cli import edgellm

    args = ["generate", "-p", REPEATING, "-n", "24", "--greedy", "--ignore-eos", "--json"]
    plain = json.loads(edgellm(*args).stdout)
    drafted = json.loads(edgellm(*args, "--lookup", "5").stdout)
    assert drafted["tokens"] == plain["tokens"] and drafted["text"] == plain["text"]


def plain_and_drafted(backend, tokenizer, prompt_ids, max_tokens, **kw):
    out = []
    for lookup in (None, LookupConfig(max_draft=6)):
        session = backend.open_session(max_tokens=max_tokens)
        events = list(generate(session, tokenizer, prompt_ids, GenerationConfig(lookup=lookup, **kw)))
        out.append(([e.token_id for e in events], events[-1].finish_reason if events else None, session.position))
    return out


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 8, 13])
def test_token_limits_inside_a_run_of_accepted_guesses(reference, tokenizer, max_new):
    """The limit falls on the first token, on guesses, or after a rejection, depending on max_new."""
    prompt = tokenizer.encode(REPEATING)
    plain, drafted = plain_and_drafted(reference, tokenizer, prompt, 128, max_new_tokens=max_new,
                                       sampling=SamplingConfig(greedy=True), stop_at_eos=False)
    assert drafted == plain and len(plain[0]) == max_new


@pytest.mark.parametrize("room", [1, 2, 4, 7])
def test_context_limit_clips_the_guesses(reference, tokenizer, room):
    prompt = tokenizer.encode(REPEATING)
    plain, drafted = plain_and_drafted(reference, tokenizer, prompt, len(prompt) + room, max_new_tokens=40,
                                       sampling=SamplingConfig(greedy=True), stop_at_eos=False)
    assert drafted == plain and plain[1] == "length" and plain[2] == len(prompt) + room


def test_eos_ends_a_drafted_chat_reply_like_a_plain_one(reference, tokenizer, model):
    from edgellm.model.chat import render_chat

    ids = tokenizer.encode(render_chat(model.tokenizer, [{"role": "user", "content": "What is 2+2?"}]),
                           parse_special=True)  # test_generation: the reply ends at EOS within 100 tokens
    plain, drafted = plain_and_drafted(reference, tokenizer, ids, 256, max_new_tokens=100,
                                       sampling=SamplingConfig(greedy=True))
    assert drafted == plain and plain[1] == "eos"


def test_a_consumer_that_stops_early_and_closes_leaves_the_plain_cache(reference, tokenizer):
    from edgellm.runtime.generation import decode_tokens
    from edgellm.runtime.sampling import Sampler

    prompt = tokenizer.encode(REPEATING)
    got = {}
    for lookup in (None, LookupConfig(max_draft=6)):
        session = reference.open_session(max_tokens=128)
        logits = session.forward(np.asarray(prompt))[-1]
        tokens = decode_tokens(session, logits, list(prompt), Sampler(SamplingConfig(greedy=True)), 30, lookup)
        taken = [next(tokens)[0] for _ in range(9)]
        tokens.close()
        got[lookup is None] = (taken, session.position)
        assert session.position == len(prompt) + 8  # every taken token but the last is in the cache
        assert list(decode_tokens(session, logits, [], Sampler(SamplingConfig()), 0, lookup)) == []
    assert got[True] == got[False]


def test_llamacpp_without_every_logit_refuses_drafting_and_stays_usable(model, tokenizer):
    from edgellm.runtime.registry import create_backend

    backend = create_backend("llama.cpp", model, threads=2)  # logits_all=False
    session = backend.open_session(max_tokens=128)
    with pytest.raises(ConfigError, match="logits_all=True"):
        list(generate(session, tokenizer, tokenizer.encode(REPEATING),
                      GenerationConfig(max_new_tokens=30, sampling=SamplingConfig(greedy=True), stop_at_eos=False,
                                       lookup=LookupConfig())))
    position = session.position
    session.forward(np.asarray([42]))  # the refused pass did not advance llama.cpp's own context
    assert session.position == position + 1
