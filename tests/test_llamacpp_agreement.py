"""The exact reference beside llama.cpp, and perplexity reproduced for both engines.

llama.cpp quantizes activations to 8 bits inside its matmuls, so an exact float reference agrees with
it on about 93-94 % of top-1 predictions over 512 tokens (shared/notes/baselines.md); we require 93 %.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.bench.perplexity import perplexity

MIN_TOP1_AGREEMENT = 0.93
PPL_REL_TOL = 0.005  # 0.5 %
REFERENCE_PPL = 22.70  # torch fp32 on the dequantized Q4_1 weights (baselines.md)
LLAMACPP_PPL = 22.78  # llama.cpp on the shipped Q4_1


def test_top1_agreement_with_llamacpp_over_512_tokens(reference, llamacpp, alice_ids):
    ids = np.asarray(alice_ids[:512])
    ours = reference.open_session(max_tokens=512).forward(ids, all_logits=True)
    theirs = llamacpp.open_session(max_tokens=512).forward(ids, all_logits=True)
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    mean_diff = float(np.abs(ours - theirs).mean())
    print(f"top-1 agreement {agree:.4f}, mean |logit diff| {mean_diff:.3f}")
    assert agree >= MIN_TOP1_AGREEMENT, f"agreement {agree:.4f}, mean |diff| {mean_diff:.3f}"
    assert mean_diff < 0.3


@pytest.mark.slow
def test_reference_perplexity_reproduces_baseline(reference, alice_ids):
    result = perplexity(reference, alice_ids[:8192], window=512)
    assert result.n_predictions == 16 * 511
    assert abs(result.ppl / REFERENCE_PPL - 1) < PPL_REL_TOL, result.ppl


@pytest.mark.slow
def test_llamacpp_perplexity_reproduces_baseline(llamacpp, alice_ids):
    result = perplexity(llamacpp, alice_ids[:8192], window=512)
    assert result.n_predictions == 16 * 511
    assert abs(result.ppl / LLAMACPP_PPL - 1) < PPL_REL_TOL, result.ppl


def test_perplexity_matches_a_direct_numpy_computation(reference, alice_ids):
    ids = np.asarray(alice_ids[1000:1100])
    logits = reference.open_session(max_tokens=100).forward(ids, all_logits=True).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = float(np.exp(-logp[np.arange(99), ids[1:]].mean()))
    result = perplexity(reference, ids, window=100)
    assert result.n_predictions == 99
    assert abs(result.ppl - expected) < 1e-6 * expected


def test_windowing_with_a_shorter_tail(reference, alice_ids):
    result = perplexity(reference, alice_ids[:70], window=32)
    assert result.n_windows == 3 and result.n_predictions == 31 + 31 + 5


def test_overlapping_windows_score_every_token_once(reference, alice_ids):
    """stride < window: later windows score only the tokens the previous window did not."""
    ids = alice_ids[:113]
    result = perplexity(reference, ids, window=64, stride=48)
    assert result.n_predictions == len(ids) - 1
    assert all(np.isfinite(result.window_ppl))
