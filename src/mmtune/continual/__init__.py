"""Continual learning: learn a sequence of tasks without forgetting, and measure the forgetting.

- :func:`run_continual` (``mmtune continual RECIPE``): the runner (runner.py)
- ``STRATEGIES``: naive, joint, ewc, online_ewc, lwf, feature_kd, zscl, replay, derpp, agem,
  gem, task_lora, olora, l2p (strategies/); several compose (strategies/compose.py)
- sweep.py / sweep_report.py: ``mmtune continual sweep``, strategies x seeds, one report
- metrics.py: ACC, average incremental accuracy, BWT, FWT, forgetting (two conventions)
- buffer.py: reservoir and class-balanced rehearsal memories, in RAM or on disk
- benchmarks.py: Split-Digits (class / task / domain incremental) and the text task sequence
- multimodal.py: the modality-dynamic sequence (VQA -> OCR -> speech) on a composed model
- general.py: general-ability probes (evaluated after every task, never trained)
- report.py: Markdown report, heatmap of R, per-task curves, metrics JSON

Names are imported lazily: ``mmtune.config`` imports :mod:`mmtune.continual.config` (the recipe
section) without pulling in torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "run_continual": "runner", "summarize": "metrics", "STRATEGIES": "strategies", "Strategy": "strategies",
    "StrategyContext": "strategies", "TaskInfo": "strategies", "ContinualConfig": "config",
    "StrategyConfig": "config", "TaskConfig": "config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
