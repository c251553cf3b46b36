"""The training objective of a composed model, for :class:`mmtune.train.loop.Trainer`.

A batch from :func:`mmtune.multimodal.data.collate_mm` holds one sub-batch per modality group;
each runs through :meth:`ComposedModel.forward` with its own route (adapter and audio
projector), and the summed next-token losses are added, so a micro-batch may mix groups and
every sample is trained through the adapter the router gives it. Like every mmtune objective it
returns the loss *sum* and the number of supervised tokens; the loop normalises over the whole
optimizer step.

:func:`token_accuracy` scores teacher-forced next-token predictions on the supervised
positions with the same forward pass (used by the demo's caption / OCR / ASR scores).
"""

from __future__ import annotations

import torch

from ..train.objectives import LossOutput, Objective, shifted_token_loss

_MODEL_KEYS = ("input_ids", "position_ids", "attention_mask", "images", "audios", "group")


def model_batch(group_batch: dict) -> dict:
    """The keys of a sub-batch that :meth:`ComposedModel.forward` takes."""
    return {k: group_batch[k] for k in _MODEL_KEYS if k in group_batch}


class MultimodalObjective(Objective):
    """Next-token cross-entropy on the supervised positions, summed over the modality groups of
    the batch; the metrics count the samples per route (group -> adapter)."""

    name = "multimodal_sft"

    def count(self, batch: dict) -> int:
        return int(sum((g["labels"][:, 1:] != -100).sum() for g in batch["groups"]))

    def __call__(self, model, batch: dict) -> LossOutput:
        loss_sum, count = None, 0
        routes: dict[str, float] = {}
        outputs = []
        for g in batch["groups"]:
            out = model(**model_batch(g))
            labels = g["labels"].to(out.logits.device)
            l_sum, n = shifted_token_loss(out.logits, labels)
            loss_sum = l_sum if loss_sum is None else loss_sum + l_sum
            count += int(n)
            key = f"samples/{out.route.group}->{out.route.adapter or 'base'}"
            routes[key] = routes.get(key, 0.0) + float(g["input_ids"].shape[0])
            outputs.append(out)
        return LossOutput(loss_sum, count, outputs, metrics=routes)


@torch.no_grad()
def token_accuracy(model, batch: dict) -> tuple[int, int]:
    """``(correct, total)`` argmax next-token predictions on the supervised positions of a
    :func:`~mmtune.multimodal.data.collate_mm` batch (teacher forcing)."""
    correct = total = 0
    for g in batch["groups"]:
        out = model(**model_batch(g))
        labels = g["labels"].to(out.logits.device)[:, 1:]  # (B, T-1)
        pred = out.logits[:, :-1].argmax(-1)  # (B, T-1)
        mask = labels != -100
        correct += int((pred[mask] == labels[mask]).sum())
        total += int(mask.sum())
    return correct, total
