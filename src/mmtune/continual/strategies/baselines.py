"""The two reference points every continual-learning result is read against.

- ``naive``: plain fine-tuning on each task in turn (the lower bound: catastrophic forgetting).
- ``joint``: at task t, training on the union of tasks 1..t (Avalanche's "cumulative" baseline;
  the upper bound, it sees all past data). With ``train.epochs`` the number of steps grows with
  the union; with ``train.max_steps`` it stays fixed per task.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import STRATEGIES, Strategy, TaskInfo


@STRATEGIES.register("naive")
class Naive(Strategy):
    """Fine-tune on each task, nothing else."""

    name = "naive"


@STRATEGIES.register("joint")
class Joint(Strategy):
    """Train on every task seen so far (an upper bound, not a continual learner)."""

    name = "joint"

    def train_rows(self, task: TaskInfo, rows: list, seen: Sequence[list]) -> list:
        return [r for task_rows in seen for r in task_rows]
