"""Tokenizer built from a GGUF's metadata with the `tokenizers` library (no hand-written BPE).

llama.cpp picks its pre-tokenizer regexes by the `tokenizer.ggml.pre` name; the table below gives the
same splits for the names edgellm supports. Parity with llama.cpp's token ids is tested on real text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgellm.errors import ConfigError, unknown_name
from edgellm.model.description import TokenizerSpec

# GPT-2's split rule; llama.cpp uses it (alone or after a digit split) for these pre-tokenizer names.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerRule:
    """How text is split before BPE: individual digits first, then one regex."""

    split_digits: bool
    regex: str


PRE_TOKENIZERS: dict[str, PreTokenizerRule] = {
    "gpt2": PreTokenizerRule(split_digits=False, regex=_GPT2_SPLIT),
    "default": PreTokenizerRule(split_digits=False, regex=_GPT2_SPLIT),
    # starcoder-family vocabularies (SmolLM, SmolLM2, StarCoder, Refact): digits split one by one
    "smollm": PreTokenizerRule(split_digits=True, regex=_GPT2_SPLIT),
    "starcoder": PreTokenizerRule(split_digits=True, regex=_GPT2_SPLIT),
    "refact": PreTokenizerRule(split_digits=True, regex=_GPT2_SPLIT),
    "llama3": PreTokenizerRule(split_digits=False, regex=_LLAMA3_SPLIT),
    "llama-bpe": PreTokenizerRule(split_digits=False, regex=_LLAMA3_SPLIT),
}

CONTROL_TOKEN_TYPES = (3, 4)  # llama.cpp: control, user-defined -> matched as whole special tokens


class Tokenizer:
    """Text <-> ids with llama.cpp's conventions (BOS only if the model adds one)."""

    def __init__(self, spec: TokenizerSpec) -> None:
        self.spec = spec
        self._tok = _build(spec)
        self._tok_plain = _build(spec)
        self._tok_plain.encode_special_tokens = True  # special-token text is ordinary text
        self.eos_ids: frozenset[int] = frozenset(
            i for i in (spec.eos_id, *spec.extra_eos_ids) if i is not None
        )

    @property
    def vocab_size(self) -> int:
        return len(self.spec.tokens)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids; `parse_special` turns '<|im_start|>' text into its control token, as llama.cpp's
        `special=True` does. BOS is prepended when the model asks for it (or `add_bos` says so)."""
        tok = self._tok if parse_special else self._tok_plain
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.spec.add_bos
        if add_bos and self.spec.bos_id is not None:
            ids = [self.spec.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def hf_tokenizer(self):
        """The underlying `tokenizers.Tokenizer` (special tokens parsed), e.g. to save tokenizer.json."""
        return self._tok

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (streaming decoders join these)."""
        return self.decode([token_id]).encode("utf-8", errors="surrogatepass")

    def is_control(self, token_id: int) -> bool:
        return self.spec.token_types[token_id] in CONTROL_TOKEN_TYPES


def _build(spec: TokenizerSpec):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if spec.hf_json is not None:
        return HFTokenizer.from_str(spec.hf_json)
    if spec.model != "gpt2":
        raise ConfigError(
            f"tokenizer model {spec.model!r} is not supported yet; supported: gpt2 (byte-level BPE)"
        )
    if spec.pre not in PRE_TOKENIZERS:
        raise unknown_name("pre-tokenizer", spec.pre, list(PRE_TOKENIZERS))
    rule = PRE_TOKENIZERS[spec.pre]
    vocab = {token: i for i, token in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    steps = []
    if rule.split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Split(Regex(rule.regex), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(spec.tokens, spec.token_types, strict=True)
        if kind in CONTROL_TOKEN_TYPES
    ]
    tok.add_special_tokens(specials)
    return tok
