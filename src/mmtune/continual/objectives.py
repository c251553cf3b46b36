"""Objectives of the continual benchmarks, with outputs strategies can use.

Both return a :class:`~mmtune.train.objectives.LossOutput` whose ``outputs`` is a
:class:`Forward`: the logits and (optionally) features at the *supervised items only*, flattened
to (N, C) / (N, H) -- a digit for the classifier, a supervised token position for a language
model. Strategies (LwF, DER++, feature distillation) compare these row by row with a teacher's or
with stored values, without knowing which kind of model produced them. For the same batch,
rows are in the same order every time (row-major over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..train.objectives import LossOutput, Objective, model_inputs, shifted_token_loss

#: Logit given to classes outside a task's head in the task-incremental scenario. Finite (not
#: -inf) so that softmax-based distillation never computes 0 * log 0; -1e4 is far below any
#: trained logit and representable in fp16/bf16.
MASKED_LOGIT = -1e4


@dataclass
class Forward:
    logits: torch.Tensor  # (N, C) raw logits at the supervised items (no head mask applied)
    features: torch.Tensor | None = None  # (N, H) input of the output layer at the same items
    aux: dict = field(default_factory=dict)  # model-specific extra outputs (e.g. L2P key loss)


def apply_head_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits restricted to each row's allowed classes; ``mask`` (N, C) bool or None."""
    if mask is None:
        return logits
    return logits.masked_fill(~mask, MASKED_LOGIT)


class ClassifierObjective(Objective):
    """Summed cross-entropy of a classifier. Batch: ``x`` (B, D), ``y`` (B,), optional ``mask``
    (B, C) bool of the classes each row may predict (task-incremental heads)."""

    name = "classify"

    def count(self, batch: dict) -> int:
        return int(batch["y"].shape[0])

    def __call__(self, model, batch: dict) -> LossOutput:
        out = model(batch["x"])
        logits = out.logits.float()  # (B, C)
        loss = F.cross_entropy(apply_head_mask(logits, batch.get("mask")), batch["y"], reduction="sum")
        return LossOutput(loss, int(batch["y"].shape[0]), Forward(logits, out.features, dict(out.aux)))


class ContinualLMObjective(Objective):
    """Next-token cross-entropy (as the ``sft`` objective) whose outputs are the logits, and with
    ``features=True`` the last hidden states, at the supervised positions."""

    name = "sft"

    def __init__(self, features: bool = False):
        self.features = features

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def __call__(self, model, batch: dict) -> LossOutput:
        kwargs = {"output_hidden_states": True} if self.features else {}
        out = model(**model_inputs(batch), use_cache=False, **kwargs)
        loss_sum, n = shifted_token_loss(out.logits, batch["labels"])
        sel = batch["labels"][:, 1:] != -100  # (B, T-1): position t predicts token t+1
        logits = out.logits[:, :-1][sel].float()  # (N, V)
        feats = out.hidden_states[-1][:, :-1][sel].float() if self.features else None  # (N, H)
        return LossOutput(loss_sum, n, Forward(logits, feats))
