"""Token losses computed from a model's logits (the models layer: a composed model's ``forward``
returns its loss when given labels, as Hugging Face models do; the objectives reuse them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy and the number of supervised tokens.

    ``labels`` are aligned with the inputs (Hugging Face convention); position t's logits
    predict labels[t+1]; -100 marks positions without loss.
    """
    logits = logits[:, :-1, :].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, (target != -100).sum()
