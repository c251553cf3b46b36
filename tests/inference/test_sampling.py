"""Sampling: the distribution we draw from equals transformers' warpers (temperature, top-k,
top-p) on a fixed logits vector, and seeded draws follow it and are reproducible."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mmtune.inference.sampling import next_token_probs, sample_token, top_k_filter, top_p_filter

LOGITS = torch.tensor([2.0, 1.5, 0.3, -0.2, 1.0, -1.0, 0.7, 0.1])
CASES = [(1.0, 1.0, 0), (0.5, 1.0, 0), (2.0, 1.0, 0), (1.0, 1.0, 3), (1.0, 0.8, 0), (0.7, 0.9, 5)]


def hf_probs(temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, LOGITS[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores[0], dim=-1)


@pytest.mark.parametrize("temperature,top_p,top_k", CASES)
def test_distribution_equals_transformers_warpers(temperature, top_p, top_k):
    ours = next_token_probs(LOGITS, temperature, top_p, top_k)
    assert torch.allclose(ours, hf_probs(temperature, top_p, top_k), atol=1e-6)


@pytest.mark.parametrize("temperature,top_p,top_k", CASES[1:3] + CASES[-1:])
def test_seeded_draws_follow_the_distribution(temperature, top_p, top_k):
    n = 5000
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(LOGITS, temperature, top_p, top_k, gen) for _ in range(n)])
    freq = torch.bincount(draws, minlength=len(LOGITS)).float() / n
    expected = hf_probs(temperature, top_p, top_k)
    assert (freq - expected).abs().max() < 0.03  # the largest std of one frequency is 0.007
    assert torch.all(freq[expected == 0] == 0)  # filtered tokens are never drawn


def test_temperature_top_k_top_p_change_the_distribution():
    p1, cold, hot = (next_token_probs(LOGITS, t) for t in (1.0, 0.5, 2.0))
    assert cold[0] > p1[0] > hot[0] and cold.max() - cold.min() > hot.max() - hot.min()
    assert int((next_token_probs(LOGITS, 1.0, top_k=3) > 0).sum()) == 3
    kept = next_token_probs(LOGITS, 1.0, top_p=0.8) > 0
    assert kept.tolist() == [True, True, False, False, True, False, True, False]  # 0.36+0.22+0.13+0.10 >= 0.8
    assert torch.equal(top_k_filter(LOGITS, 0), LOGITS) and torch.equal(top_p_filter(p1, 1.0), p1)


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sample_token(LOGITS, 1.0, 0.95, 0, gen) for _ in range(50)]

    assert run(1) == run(1) and run(1) != run(2)
    assert sample_token(LOGITS, 0.0) == 0 and sample_token(-LOGITS, 0.0) == 5
    with pytest.raises(ValueError, match="temperature > 0"):
        next_token_probs(LOGITS, 0.0)
