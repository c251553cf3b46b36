"""Several strategies in one run (``continual.strategy: [replay, lwf]``): Avalanche's list of
plugins, with mmtune's hook contract.

Every hook of the :class:`Composite` calls the same hook of each member, in list order. Because
a hook only returns named loss terms (and runs extra forwards under its own seeded RNG), the
loss terms of the members simply add up, and the Trainer logs each under its own name (``replay``,
``lwf``, ``ewc``, ...): the order of the list does not change the result. Where order would
matter the composition is refused at construction:

- at most one member may edit gradients (``after_backward``: A-GEM, GEM);
- at most one member may give its own optimizer parameter groups;
- two members may not return a loss term of the same name (checked at the first step).

``setup`` wraps the model member after member (adapters, then a prompt pool), ``train_rows``
passes each member's rows to the next (``joint`` then anything), ``route`` nests the members'
routing contexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch

from ...errors import ConfigError, MMTuneError
from .base import Strategy, StrategyContext, TaskInfo


def check_composable(classes: Sequence[type[Strategy]]) -> None:
    """Raise ValueError if the strategies cannot be composed without their order mattering."""
    Strategy.check_composable(classes)


class Composite(Strategy):
    """The members' hooks in list order; their loss terms add up, each logged under its name."""

    name = "composite"

    def __init__(self, members: Sequence[Strategy], ctx: StrategyContext):
        super().__init__(None, ctx)
        if len(members) < 2:
            raise ConfigError("a composed strategy needs at least two members")
        try:
            check_composable([type(m) for m in members])
        except ValueError as e:
            raise ConfigError(f"continual.strategy: {e}") from None
        self.members = list(members)
        self.name = "+".join(m.name for m in members)

    @property
    def needs_features(self) -> bool:  # type: ignore[override]
        return any(m.needs_features for m in self.members)

    @property
    def needs_task_id(self) -> bool:  # type: ignore[override]
        return any(m.needs_task_id for m in self.members)

    def setup(self, model):
        for m in self.members:
            model = m.setup(model)
        return model

    def train_rows(self, task: TaskInfo, rows: list, seen: Sequence[list]) -> list:
        for m in self.members:
            rows = m.train_rows(task, rows, seen)
        return rows

    def before_task(self, model, task: TaskInfo) -> None:
        super().before_task(model, task)
        for m in self.members:
            m.before_task(model, task)

    def optimizer_groups(self, model) -> list[dict] | None:
        for m in self.members:
            groups = m.optimizer_groups(model)
            if groups is not None:
                return groups
        return None

    def loss_terms(self, batch: dict, outputs) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        owner: dict[str, str] = {}
        for m in self.members:
            for key, value in m.loss_terms(batch, outputs).items():
                if key in terms:
                    raise MMTuneError(f"continual.strategy: {owner[key]} and {m.name} both return a loss term "
                                      f"'{key}'; they cannot be composed")
                terms[key], owner[key] = value, m.name
        return terms

    def after_backward(self, model) -> None:
        for m in self.members:
            m.after_backward(model)

    def after_step(self, step: int) -> None:
        for m in self.members:
            if hasattr(m, "after_step"):
                m.after_step(step)

    def after_task(self, model, task: TaskInfo, rows: list) -> None:
        for m in self.members:
            m.after_task(model, task, rows)

    @contextmanager
    def route(self, model, task: TaskInfo):
        with ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.route(model, task))
            yield

    def state_dict(self) -> dict:
        return {m.name: m.state_dict() for m in self.members}

    def load_state_dict(self, state: dict) -> None:
        for m in self.members:
            m.load_state_dict(state[m.name])
