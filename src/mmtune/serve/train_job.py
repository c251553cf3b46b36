"""A training run in a background thread, for the web UI's Train tab.

:class:`TrainJob` runs :func:`mmtune.workflows.run.run_recipe` (any workflow) with a ``stop_flag``: the loop
polls it after every optimizer step and, once it is set, leaves the loop, runs the final
evaluation and saves a checkpoint (``OUTPUT/checkpoints/step-N`` and ``OUTPUT/final``), so a
stopped run can be resumed with ``--resume`` or chatted with. Progress is read back from the
run's ``metrics.jsonl`` (:func:`mmtune.train.metrics_log.read_metrics`), the same file
``mmtune train`` writes, so the UI shows exactly what the logs hold.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..errors import MMTuneError
from ..train.metrics_log import read_metrics
from ..workflows.run import run_recipe

#: Job states. ``stopping``: Stop was pressed and the current step is finishing.
STATES = ("running", "stopping", "stopped", "finished", "failed")


def total_steps(recipe, rows: list[dict]) -> int | None:
    """The run's optimizer steps, as the Trainer computes them.

    ``train.max_steps`` when set. Otherwise ``ceil(epochs * batches_per_epoch / grad_accum)``
    (:class:`mmtune.train.loop.Trainer`), where ``batches_per_epoch`` is read back from the
    first logged row: the loop logs ``epoch = micro_batches / batches_per_epoch`` with
    ``micro_batches = step * grad_accum``. None before the first row is logged.
    """
    cfg = recipe.train
    if cfg.max_steps is not None:
        return cfg.max_steps
    row = next((r for r in rows if r.get("step") and r.get("epoch")), None)
    if row is None:
        return None
    per_epoch = max(1, round(row["step"] * cfg.grad_accum / row["epoch"]))
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


@dataclass
class Progress:
    state: str
    step: int
    total: int | None
    loss: float | None
    eval_loss: float | None
    elapsed: float

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


class TrainJob:
    """One run of ``recipe`` in a daemon thread.

    ``recipe.train.progress`` is switched off (the UI shows progress; a tqdm bar would only
    fill the server's console).
    """

    def __init__(self, recipe, resume: bool = False, overwrite: bool = False, source: str = "", log_lines: int = 400):
        self.recipe = recipe
        self.recipe.train.progress = False
        self.resume, self.overwrite, self.source = resume, overwrite, source or "recipe"
        self.output_dir = Path(recipe.train.output_dir)
        self.can_stop = True  # every workflow's loop polls the stop flag after each optimizer step
        self.lines: deque[str] = deque(maxlen=log_lines)
        self.state = "running"
        self.error: str | None = None
        self.result: dict | None = None
        self.final_dir: Path | None = None
        self.total: int | None = None  # the Trainer's total_steps, known once the run has ended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._t1 = 0.0

    # -- control -----------------------------------------------------------------------------
    def start(self) -> TrainJob:
        self._t0 = time.time()
        self.log(f"starting {self.source} -> {self.output_dir}")
        self._thread = threading.Thread(target=self._run, name="mmtune-train", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> bool:
        """Ask the run to stop after the current step; False if it cannot be stopped."""
        if self.state != "running" or not self.can_stop:
            return False
        self._stop.set()
        self.state = "stopping"
        self.log("stop requested: finishing the current step, then evaluating and saving a checkpoint")
        return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def log(self, msg: str) -> None:
        for line in str(msg).splitlines() or [""]:
            self.lines.append(f"[{time.strftime('%H:%M:%S')}] {line}")

    def _run(self) -> None:
        try:
            result = run_recipe(self.recipe, resume=self.resume, overwrite=self.overwrite, log=self.log,
                                stop_flag=self._stop.is_set)
            trainer = result.pop("trainer", None)
            self.total = getattr(trainer, "total_steps", None)
            self.result = result
            self.final_dir = Path(result["final_dir"]) if result.get("final_dir") else self.output_dir / "final"
            self.state = "stopped" if result.get("stopped") else "finished"
            self.log(f"{self.state} at step {result.get('steps')}; weights saved to {self.final_dir}")
        except MMTuneError as e:
            self.error, self.state = str(e), "failed"
            self.log(f"error: {e}")
        except Exception as e:  # a bug, not a user error: keep the traceback for the log view
            self.error, self.state = f"{type(e).__name__}: {e}", "failed"
            self.log(traceback.format_exc())
        finally:
            self._t1 = time.time()

    # -- reading -----------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        try:
            return read_metrics(self.output_dir)
        except (OSError, ValueError):  # a line being written: read again at the next poll
            return []

    def progress(self, rows: list[dict] | None = None) -> Progress:
        rows = self.metrics() if rows is None else rows
        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        step = max((int(r.get("step", 0)) for r in rows), default=0)
        if self.result is not None:
            step = int(self.result.get("steps", step))
        end = self._t1 if self._t1 else time.time()
        return Progress(self.state, step, self.total or total_steps(self.recipe, rows),
                        steps[-1]["loss"] if steps else None, evals[-1]["eval_loss"] if evals else None,
                        end - self._t0 if self._t0 else 0.0)

    def samples(self, rows: list[dict] | None = None) -> list[list]:
        """``[step, prompt, output]`` of every sample generation logged, newest first."""
        rows = self.metrics() if rows is None else rows
        out = []
        for r in rows:
            for s in r.get("samples") or []:
                text = s.get("output", "")
                if not text.strip():  # an early model often answers with newlines only
                    text = "(whitespace only)" if text else "(empty)"
                out.append([r.get("step"), s.get("prompt", ""), text])
        return out[::-1]

    def chat_dir(self) -> Path | None:
        """What the Chat tab should load once the run has ended: its ``final`` directory."""
        if self.final_dir is not None and self.final_dir.exists():
            return self.final_dir
        return None
