"""The continual-learning plugin interface and the ``STRATEGIES`` registry.

A strategy is a :class:`~mmtune.train.loop.Trainer` plugin whose hooks mirror the loop, plus
task-level hooks the continual runner calls around each ``Trainer.fit()``:

=================================  =============================================================
``setup(model) -> model``          once, before the first task (and on resume, before the saved
                                   weights are loaded): wrap the model (adapters, prompt pool)
``train_rows(task, rows, seen)``   the examples to train on for ``task`` (joint: all seen tasks)
``before_task(model, task)``       snapshot a teacher, choose what trains (``set_trainable``)
``optimizer_groups(model)``        optional per-group learning rates for the task's optimizer
``loss_terms(batch, outputs)``     named loss terms the loop adds (averaged over micro-batches)
                                   and logs; ``outputs`` is the objective's ``LossOutput``
``after_backward(model)``          may edit gradients in place (A-GEM projection)
``after_task(model, task, rows)``  consolidate: Fisher, buffer insertion, stored logits
``route(model, task)``             context manager around evaluating ``task`` (task id at test)
``state_dict`` / ``load_state_dict``  everything needed to resume (RNG states included)
=================================  =============================================================

A hook returns loss terms and never mutates the loop's state: not the loss, not the optimizer,
not the global RNG. Extra forward passes (replay batches, teachers) run under
:func:`isolated_rng`, seeded from the strategy's own generator, so the loop's random stream
(dropout, data order) is the same whatever plugins run and in whatever order (Avalanche's
``strategy.loss += ...`` made results depend on plugin order; docs/contributing.md#strategy-hooks).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, ValidationError

from ...config import Section
from ...registry import STRATEGIES, did_you_mean  # noqa: F401 - STRATEGIES is defined there (recipes check names)
from ...train.objectives import Objective


class NoSettings(Section):
    """This strategy has no settings."""


class StrategySettings(Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              populate_by_name=True)


@dataclass
class TaskInfo:
    index: int  # position in the sequence, 0-based
    name: str
    task_id: int  # identifier given with the task's examples (routing, heads)
    classes: list[int] | None = None  # output units of the task (classifiers), None for text


@dataclass
class StrategyContext:
    """What a strategy may use besides the model: given by the runner at construction."""

    objective: Objective
    collate: Callable[[list], dict]
    device: torch.device
    scenario: str  # class | task | domain
    tasks: list[TaskInfo]
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3  # the peak learning rate of each task (train.lr)
    work_dir: Path = Path(".")
    #: class of an example for class-balanced memories (a digit, or the task of a text example)
    label_fn: Callable[[dict], Hashable] = lambda row: row.get("task", 0)
    #: output-unit groups of the given tasks to distil over, softmax per group; None: all units
    kd_groups: Callable[[list[TaskInfo]], list[list[int]] | None] = lambda tasks: None
    #: unlabelled-style reference examples for ZSCL (n, seed) -> rows; None if the benchmark has none
    reference_rows: Callable[[int, int], list] | None = None
    #: LoRA defaults for this benchmark's model: r, alpha, dropout, targets
    lora_defaults: dict = field(default_factory=dict)
    log: Callable[[str], None] = print




class Strategy:
    """Base class: every hook is a no-op. Subclasses set ``name`` and ``Settings``."""

    @classmethod
    def check_composable(cls, classes) -> None:
        """Raise ValueError if ``classes`` cannot be composed without their order mattering: a
        strategy listed twice, or two that both edit gradients or both set optimizer groups.
        A class method, so that the recipe schema checks a composition through the registry."""
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"{'+'.join(names)} lists a strategy twice; give each once")
        for hook, what in (("after_backward", "edit gradients"), ("optimizer_groups", "set optimizer groups")):
            editors = [c.name for c in classes if getattr(c, hook) is not getattr(Strategy, hook)]
            if len(editors) > 1:
                raise ValueError(f"{' and '.join(editors)} both {what}, so their order would change the result; "
                                 "compose at most one of them")

    name = "base"
    Settings: type[Section] = NoSettings
    #: the objective must return features (feature distillation)
    needs_features = False
    #: the task id must be known at test time (per-task routing)
    needs_task_id = False

    def __init__(self, settings: Section, ctx: StrategyContext):
        self.settings = settings
        self.ctx = ctx
        self.model = None
        self.task: TaskInfo | None = None
        self.rng = random.Random(f"{ctx.seed}-{self.name}")

    # ---------------------------------------------------------------- settings
    @classmethod
    def parse_settings(cls, raw: dict | None) -> Section:
        """Validate ``raw`` against ``Settings``; a ValueError names the bad key and the valid ones."""
        try:
            return cls.Settings.model_validate(raw or {})
        except ValidationError as e:
            fields = cls.Settings.model_fields
            valid = [f.alias or n for n, f in fields.items()]
            msgs = []
            for err in e.errors():
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    msgs.append(f"unknown setting '{key}' for strategy '{cls.name}'.{did_you_mean(key, valid)} "
                                f"Valid settings: {', '.join(valid) or '(none)'}")
                else:
                    msg = err["msg"].removeprefix("Value error, ")
                    msgs.append(f"strategy '{cls.name}' setting '{key}': {msg} (got {err.get('input')!r})")
            raise ValueError("; ".join(msgs)) from None

    # ---------------------------------------------------------------- hooks
    def setup(self, model):
        return model

    def train_rows(self, task: TaskInfo, rows: list, seen: Sequence[list]) -> list:
        return rows

    def before_task(self, model, task: TaskInfo) -> None:
        self.model, self.task = model, task

    def optimizer_groups(self, model) -> list[dict] | None:
        """Parameter groups with their own learning rates for this task's optimizer (None: all
        trainable parameters at ``train.lr``); passed to the Trainer as ``optimizer_groups``."""
        return None

    def loss_terms(self, batch: dict, outputs) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, model) -> None:
        return None

    def after_task(self, model, task: TaskInfo, rows: list) -> None:
        return None

    def route(self, model, task: TaskInfo):
        return nullcontext()

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    # ---------------------------------------------------------------- helpers
    def draw_seed(self) -> int:
        return self.rng.randrange(2**62)

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.ctx.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def mean_loss(self, model, rows: list) -> tuple[torch.Tensor, object]:
        """Mean objective loss of ``model`` on ``rows`` (collated), and the objective's outputs."""
        out = self.ctx.objective(model, self.to_device(self.ctx.collate(rows)))
        return out.loss_sum / max(float(out.count), 1.0), out


# ---------------------------------------------------------------------------------------------
# Shared tools


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with its own seeded torch RNG, leaving the caller's RNG state untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every submodule's own ``training`` flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


@contextmanager
def preserve_trainability(model: torch.nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` after the block (PEFT's ``set_adapter`` flips them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def set_trainable(model: torch.nn.Module, trainable: Callable[[str], bool]) -> list[str]:
    """The one place a strategy decides what trains: ``requires_grad = trainable(name)`` for every
    floating-point parameter. Returns the sorted trainable names (logged and tested)."""
    names = []
    for n, p in model.named_parameters():
        on = bool(trainable(n)) and p.is_floating_point()
        p.requires_grad_(on)
        if on:
            names.append(n)
    return sorted(names)


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (for a LoRA model: the adapter weights only)."""
    return {n: p.detach().clone() for n, p in trainable_params(model).items()}


class Teacher:
    """``model`` with its parameters replaced by ``params`` (a :func:`snapshot`), evaluated without
    gradients in eval mode. Costs no copy of the frozen weights: for a PEFT model the teacher is
    the same base model with the snapshotted adapter weights (``torch.func.functional_call``)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), eval_mode(self.model):
            return torch.func.functional_call(self.model, self.params, args, kwargs, strict=False)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            groups: list[list[int]] | None = None) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): KL(softmax(t/T) || softmax(s/T)) * T^2, mean
    over rows, and over ``groups`` of output units (one softmax per group; None: all units).
    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton 2015, sec. 2)."""
    student, teacher = student.float(), teacher.float()  # (N, C)
    if student.shape[0] == 0:
        return student.sum() * 0.0
    cols = groups if groups else [None]
    total = student.new_zeros(())
    for g in cols:
        s = student if g is None else student[:, g]
        t = teacher if g is None else teacher[:, g]
        log_p = F.log_softmax(s / temperature, dim=-1)
        q = F.softmax(t / temperature, dim=-1)
        total = total + F.kl_div(log_p, q, reduction="batchmean") * temperature**2
    return total / len(cols)
