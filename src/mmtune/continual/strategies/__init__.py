"""Continual-learning strategies, one file per family, registered by name in ``STRATEGIES``.

- baselines: naive, joint
- regularization: ewc, online_ewc
- distillation: lwf, feature_kd, zscl
- replay: replay, derpp, agem
- gem: gem (the dual QP of qp.py)
- architecture: task_lora, olora
- prompts: l2p
"""

from . import architecture, baselines, distillation, gem, prompts, regularization, replay  # noqa: F401  (registration)
from .base import STRATEGIES, Strategy, StrategyContext, TaskInfo

__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "TaskInfo"]
