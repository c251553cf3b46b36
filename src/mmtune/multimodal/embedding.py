"""Early fusion: media features written into the LM's input embeddings at their placeholder tokens.

Each ``<image>`` / ``<audio>`` tag of a prompt was expanded by the data pipeline into a run of
exactly as many placeholder tokens as the item has feature tokens; here the k-th placeholder of
a batch (row-major) takes the k-th feature row, so the k-th run takes the k-th item (LLaVA,
Phi-4, InternVL: docs/reference/multimodal.md#composition-through-input-embeddings).
"""

from __future__ import annotations

import torch

from ..errors import MMTuneError


def placeholder_mask(input_ids: torch.Tensor, token_id: int, n_feature_tokens: int, n_items: int, kind: str,
                     tag: str) -> torch.Tensor:
    """``(B, T)`` bool, True at ``token_id``; a MMTuneError unless there are exactly
    ``n_feature_tokens`` of them (the data was expanded for another model otherwise)."""
    mask = input_ids == token_id  # (B, T)
    n_slots = int(mask.sum())
    if n_slots != n_feature_tokens:
        raise MMTuneError(f"the batch has {n_slots} {kind} placeholder tokens but its {n_items} {kind}(s) "
                          f"have {n_feature_tokens} feature tokens; each {tag} tag must be expanded by the data "
                          "pipeline (mmtune.multimodal.data) for this model")
    return mask


def scatter_features(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``embeds`` ``(B, T, H)`` with the rows where ``mask`` ``(B, T)`` is True replaced, in
    row-major order, by ``features`` ``(mask.sum(), H)`` (cast to the embeddings' dtype)."""
    return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))
