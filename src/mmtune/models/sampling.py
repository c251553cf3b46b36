"""Sampling primitives shared by every generation loop (text models in :mod:`mmtune.generate`,
composed models in :meth:`mmtune.multimodal.model.ComposedModel.stream_ids`)."""

from __future__ import annotations

import torch


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
