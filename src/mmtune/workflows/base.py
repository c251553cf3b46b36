"""The workflow interface: what a kind of recipe needs from the shared runner, and gives back."""

from __future__ import annotations

import abc
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass
class RunContext:
    """What :func:`mmtune.workflows.run.run_recipe` hands a workflow's :meth:`Workflow.run`."""

    resume: bool | str = False  # True: the latest checkpoint in output_dir; a path: that checkpoint
    overwrite: bool = False  # the output directory was cleared for this run
    log: Callable[..., None] = print  # one line at a time (rank 0 only under torchrun)
    stop_flag: Callable[[], bool] | None = None  # polled after every optimizer step (web UI Stop, Ctrl-C)
    dist: object = None  # mmtune.distributed.DistContext when the workflow supports several processes
    options: dict = field(default_factory=dict)  # workflow-specific keywords of run_recipe (e.g. cache_root)


class Workflow(abc.ABC):
    """One kind of recipe. Subclasses set :attr:`name`, :attr:`run_files` and, when their
    set-up joins a process group and trains data-parallel, :attr:`supports_distributed`."""

    name: ClassVar[str] = "base"
    #: True when :meth:`run` trains data-parallel under torchrun (``--nproc N``); otherwise the
    #: runner refuses a run with several processes, instead of running N identical copies.
    supports_distributed: ClassVar[bool] = False
    #: What a run leaves in ``train.output_dir``: a fresh run refuses to mix with it, and
    #: ``--overwrite`` deletes exactly these (nothing else the user keeps there).
    run_files: ClassVar[tuple[str, ...]] = ("checkpoints", "final", "tb", "metrics.jsonl")

    @abc.abstractmethod
    def run(self, recipe, ctx: RunContext) -> dict:
        """Train ``recipe``; a dict with at least ``final_dir`` (None when stopped before the end)."""

    @abc.abstractmethod
    def evaluate(self, recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
        """``mmtune eval``: metrics of the recipe's trained model (or of ``checkpoint``)."""

    def holds_run(self, out: Path) -> bool:
        for name in self.run_files:
            p = out / name
            if p.is_file() or (p.is_dir() and any(p.iterdir())):
                return True
        return False

    def clear(self, out: Path) -> None:
        for name in self.run_files:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
