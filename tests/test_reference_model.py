"""The torch reference against independent oracles.

1. transformers loading the same GGUF (its own dequantization, its own Llama code, HF's rotate-half
   RoPE on un-permuted Q/K): logits equal to fp32 rounding, greedy tokens identical over 64 tokens.
2. Our own float64 recomputation: fp32 rounding is the only difference.
3. Cache and layer-split invariants the offloader relies on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.runtime.backend import LayerRange
from edgellm.runtime.generation import GenerationConfig, generate
from edgellm.runtime.sampling import SamplingConfig
from tests.helpers import first_difference

# fp32 rounding across 30 layers: observed max |diff| ~5e-5 on logits of magnitude ~30.
LOGIT_ATOL = 1e-3
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_model(model):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model.source.parent), gguf_file=model.source.name,
                                             dtype=torch.float32)
    return m.eval()


def test_logits_match_transformers_on_real_text(hf_model, reference, alice_ids):
    ids = np.asarray(alice_ids[:128])
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(ids)[None]).logits[0].numpy()
    ours = reference.open_session(max_tokens=128).forward(ids, all_logits=True)
    diff = np.abs(ours - theirs)
    assert diff.max() < LOGIT_ATOL, f"max |diff| {diff.max():.2e}, mean {diff.mean():.2e}"
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_match_transformers(prompt, hf_model, reference, tokenizer):
    ids = tokenizer.encode(prompt, parse_special=True)
    with torch.no_grad():
        prompt = torch.as_tensor([ids])
        # An explicit mask: <|im_end|> doubles as the pad id and must not be masked out of the prompt.
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                                do_sample=False, eos_token_id=None, pad_token_id=2, min_new_tokens=64)
    theirs = out[0, len(ids):].tolist()
    cfg = GenerationConfig(max_new_tokens=64, sampling=SamplingConfig(greedy=True), stop_at_eos=False)
    ours = [e.token_id for e in generate(reference.open_session(max_tokens=128), tokenizer, ids, cfg)]
    assert ours == theirs, f"diverged at {first_difference(ours, theirs)}"


def test_float64_recomputation_agrees(model, reference, alice_ids):
    from edgellm.runtime.registry import create_backend

    exact = create_backend("reference", model, dtype="float64")
    ids = np.asarray(alice_ids[200:264])
    hi = exact.open_session(max_tokens=64).forward(ids, all_logits=True)
    lo = reference.open_session(max_tokens=64).forward(ids, all_logits=True)
    assert np.abs(hi - lo).max() < LOGIT_ATOL


def test_incremental_decode_equals_full_forward(reference, alice_ids):
    ids = np.asarray(alice_ids[:48])
    full = reference.open_session(max_tokens=64).forward(ids, all_logits=True)
    s = reference.open_session(max_tokens=64)
    steps = [s.forward(ids[:32], all_logits=True)]
    steps += [s.forward(ids[i:i + 1], all_logits=True) for i in range(32, 48)]
    assert np.abs(np.concatenate(steps) - full).max() < 1e-4


def test_layer_split_equals_whole_model(model, reference, alice_ids):
    n = model.config.n_layers
    ids = np.asarray(alice_ids[:40])
    full = reference.open_session(max_tokens=64).forward(ids, all_logits=True)
    front = reference.open_session(LayerRange(0, 11, n), max_tokens=64)
    back = reference.open_session(LayerRange(11, n, n), max_tokens=64)
    hidden = front.forward(ids[:30])
    assert hidden.shape == (30, model.config.hidden_size)
    first = back.forward(hidden, all_logits=True)
    rest = [back.forward(front.forward(ids[i:i + 1]), all_logits=True) for i in range(30, 40)]
    assert np.abs(np.concatenate([first, *rest]) - full).max() < 1e-4


def test_truncate_rolls_back_the_cache(reference, alice_ids):
    ids = np.asarray(alice_ids[:20])
    s = reference.open_session(max_tokens=32)
    s.forward(ids)
    s.truncate(10)
    again = s.forward(ids[10:], all_logits=True)
    fresh = reference.open_session(max_tokens=32).forward(ids, all_logits=True)[10:]
    assert np.abs(again - fresh).max() < 1e-4
