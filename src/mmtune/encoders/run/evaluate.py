"""Evaluation of an encoder run on its held-out rows: the pretraining objective's parts (MLM loss,
accuracy, perplexity, pair / replaced-token accuracy) or the downstream task metrics."""

from __future__ import annotations

import math

import torch

from ...config import Recipe
from .. import downstream
from ..config import EncoderConfig
from ..objectives import EncoderObjective, build_objective
from .prepare import PRETRAIN_OBJECTIVES, Prepared


@torch.no_grad()
def evaluate_pretraining(module, rows: list[dict], collate, objective: EncoderObjective, batch_size: int = 32,
                         seed: int = 0) -> dict:
    """Exact aggregates of the objective's parts (mlm_loss, mlm_acc, pair_acc, rtd_acc, ...) over ``rows``."""
    module.eval()
    device = next(module.parameters()).device
    torch.manual_seed(seed)  # ELECTRA samples replacements from the global generator
    sums: dict[str, list[float]] = {}
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
        _, _, _, parts = objective.parts(module, batch)
        for k, (s, n) in parts.items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    out = {k: s / max(n, 1.0) for k, (s, n) in sums.items()}
    if "mlm_loss" in out:
        out["mlm_perplexity"] = math.exp(min(out["mlm_loss"], 50.0))
    out["n"] = len(rows)
    return out


def evaluate_prepared(module, prep: Prepared, recipe: Recipe, batch_size: int = 64) -> dict:
    if not prep.eval_rows:
        return {}
    enc = recipe.encoder or EncoderConfig()
    if recipe.objective in PRETRAIN_OBJECTIVES:
        return evaluate_pretraining(module, prep.eval_rows, prep.collate, build_objective(recipe.objective, enc),
                                    batch_size, recipe.train.seed)
    return downstream.evaluate(module, prep.eval_rows, prep.collate, recipe.objective, examples=prep.eval_examples,
                               max_answer_tokens=enc.max_answer_tokens, batch_size=batch_size)
