"""One streaming generate() for every backend: prompt ids in, token events out.

Works on any Session whose layer range returns logits, so the reference, llama.cpp, ONNX Runtime and
the offloader all stream identically. Text deltas are held back while they could still be an
incomplete UTF-8 character or the start of a stop string, so a caller never prints text it later
has to take back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgellm.errors import ConfigError, ContextOverflowError
from edgellm.model.tokenizer import Tokenizer
from edgellm.runtime.backend import Session
from edgellm.runtime.lookup import LookupConfig, PromptLookup
from edgellm.runtime.sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    lookup: LookupConfig | None = None  # prompt-lookup drafting (edgellm.runtime.lookup); None = one token per pass

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, found {self.max_new_tokens}")
        if any(s == "" for s in self.stop):
            raise ConfigError("stop strings must be non-empty")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it released (possibly empty while held back)."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "eos", "stop", "length" on the last event


class TextStream:
    """Turns a growing id list into safe text deltas, cutting at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already released

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text, stop string hit)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                delta = text[self.emitted:at] if at > self.emitted else ""
                self.emitted = max(self.emitted, at)
                return delta, True
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may become a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta = text[self.emitted:]
        self.emitted = len(text)
        return delta


def generate(session: Session, tokenizer: Tokenizer, prompt_ids: Sequence[int],
             config: GenerationConfig = GenerationConfig()) -> Iterator[TokenEvent]:
    """Prefill the prompt, then yield one TokenEvent per new token until EOS, a stop string or the limit."""
    if not session.layers.returns_logits or not session.layers.takes_tokens:
        raise ConfigError("generate() needs a session over the whole model (tokens in, logits out)")
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    if session.position + len(prompt_ids) > session.max_tokens:
        raise ContextOverflowError(
            f"prompt of {len(prompt_ids)} tokens does not fit the context of {session.max_tokens}"
        )
    if config.max_new_tokens == 0:
        return
    stream = TextStream(tokenizer, config.stop)
    history = list(prompt_ids)
    logits = session.forward(np.asarray(prompt_ids, dtype=np.int64))[-1]
    tokens = decode_tokens(session, logits, history, Sampler(config.sampling), config.max_new_tokens, config.lookup)
    with contextlib.closing(tokens):  # closing early (EOS, stop string) rolls back unused draft positions
        for token, last in tokens:
            if config.stop_at_eos and token in tokenizer.eos_ids:
                yield TokenEvent(token, stream.flush(), "eos")
                return
            delta, hit_stop = stream.push(token)
            if hit_stop:
                yield TokenEvent(token, delta, "stop")
                return
            if last:
                yield TokenEvent(token, delta + stream.flush(), "length")
                return
            yield TokenEvent(token, delta)


def decode_tokens(session: Session, logits: np.ndarray, history: list[int], sampler: Sampler, max_new: int,
                  lookup: LookupConfig | None = None) -> Iterator[tuple[int, bool]]:
    """Yield (token, is_last) for up to `max_new` tokens after a prefill whose last logits are `logits`.

    history (prompt and everything yielded so far) grows with each token. Once the iterator is exhausted
    or closed, the session's cache holds every yielded token but the last, as after plain decoding. With
    lookup drafting, positions of guesses not (yet) yielded are truncated away at close(): a consumer that
    stops early must close() it (generate() does) before reading session.position or reusing the session.
    """
    if max_new <= 0:
        return
    if lookup is None:
        for step in range(max_new):
            token = sampler(logits, history)
            history.append(token)
            last = step == max_new - 1 or session.position >= session.max_tokens
            yield token, last
            if last:
                return
            logits = session.forward(np.asarray([token], dtype=np.int64))[-1]
        return
    drafter = PromptLookup(lookup)
    chosen = sampler(logits, history)
    history.append(chosen)
    count = 1
    while True:
        start = session.position  # `chosen` is not in the cache yet
        last = count >= max_new or start >= session.max_tokens
        yield chosen, last
        if last:
            return
        guesses = drafter.propose(history, min(lookup.max_draft, max_new - count, session.max_tokens - start - 1))
        rows = session.forward(np.asarray([chosen, *guesses], dtype=np.int64), all_logits=bool(guesses))
        accepted, following = 0, None
        try:
            for guess in guesses:
                token = sampler(rows[accepted], history)
                if token != guess:
                    following = token  # the model's own choice at this position: the next token
                    break
                history.append(token)
                accepted += 1
                count += 1
                if count >= max_new:
                    yield token, True
                    session.truncate(start + accepted)
                    return
                yield token, False
        except GeneratorExit:  # the consumer stopped at the last accepted guess
            session.truncate(start + accepted)
            raise
        if following is None:
            following = sampler(rows[-1], history)
        session.truncate(start + 1 + accepted)
        chosen = following
        history.append(chosen)
        count += 1
