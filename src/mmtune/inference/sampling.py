"""Choosing the next token from logits: greedy, or a seeded draw after temperature, top-k and
top-p (nucleus) filtering, in that order, as transformers' ``TemperatureLogitsWarper``,
``TopKLogitsWarper`` and ``TopPLogitsWarper`` apply them (tested against them)."""

from __future__ import annotations

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the ``k`` largest set to -inf (ties at the k-th value kept); ``k <= 0`` or
    ``k >= V`` keeps all. (V,) -> (V,)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose total probability reaches ``top_p`` (always at least one), renormalised. (V,) -> (V,)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)  # (V,), (V,)
    before = torch.cumsum(sorted_p, 0) - sorted_p  # mass strictly before each token
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return kept / kept.sum()


def next_token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution a sampled token is drawn from: ``softmax(top_k(logits / temperature))``,
    then nucleus-filtered. ``temperature`` must be > 0. (V,) float -> (V,) float32."""
    if temperature <= 0:
        raise ValueError("next_token_probs needs temperature > 0 (temperature 0 is greedy: argmax)")
    scaled = top_k_filter(logits.float() / temperature, top_k)
    return top_p_filter(torch.softmax(scaled, dim=-1), top_p)


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> int:
    """The next token: argmax when ``temperature <= 0``, else one draw from
    :func:`next_token_probs` with ``generator`` (a CPU generator; the global RNG when None)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = next_token_probs(logits.float().cpu(), temperature, top_p, top_k)
    return int(torch.multinomial(probs, 1, generator=generator))
