"""AdamW and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def param_groups(model, cfg: TrainConfig, groups: list[dict] | None = None) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups.

    Biases and 1-D parameters (norm scales) get no weight decay, as in GPT-2/LLaMA training
    code. ``groups`` may give per-component learning rates: ``[{"params": [...], "lr": x}]``.
    """
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    out = []
    for g in groups:
        extra = {k: v for k, v in g.items() if k != "params"}
        params = [p for p in g["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            out.append({"params": decay, "weight_decay": cfg.weight_decay, **extra})
        if no_decay:
            out.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return out


def build_optimizer(model, cfg: TrainConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    pg = param_groups(model, cfg, groups)
    if not pg:
        raise ValueError("no trainable parameters: check adapter/freeze settings")
    return torch.optim.AdamW(pg, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup, cfg.scheduler))
