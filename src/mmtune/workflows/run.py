"""The one runner: :func:`run_recipe` (``mmtune train``, ``mmtune continual``, the web Train tab)
and :func:`eval_recipe` (``mmtune eval``) for every workflow."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MMTuneError
from ..registry import WORKFLOWS
from .base import RunContext, Workflow


def workflow_of(recipe) -> Workflow:
    """The workflow object that runs ``recipe`` (``workflow:``, or the inferred one)."""
    return WORKFLOWS.get(recipe.resolved_workflow)()


def world_size() -> int:
    """Processes of this run as torchrun describes them (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_distributed(recipe, nproc: int) -> Workflow:
    """The recipe's workflow, or one clear line when ``nproc`` > 1 and the workflow trains in one
    process only (each process would otherwise run the same copy)."""
    wf = workflow_of(recipe)
    if nproc > 1 and not wf.supports_distributed:
        able = [n for n in WORKFLOWS.names() if WORKFLOWS.get(n).supports_distributed]
        raise MMTuneError(f"--nproc {nproc} / torchrun: {wf.name} recipes train in one process only (each of the "
                          f"{nproc} processes would run the same copy); run without --nproc. Several processes: "
                          f"{', '.join(able)} recipes")
    return wf


def prepare_output_dir(out: Path, wf: Workflow, resume, overwrite: bool) -> None:
    """A fresh run refuses to mix with an old one; ``--overwrite`` deletes the old run's files."""
    if resume or not wf.holds_run(out):
        return
    if not overwrite:
        raise MMTuneError(f"{out} already holds a {wf.name} run; use --resume to continue it or --overwrite to "
                          "start over")
    wf.clear(out)


def _silent(*_a, **_k) -> None:
    pass


def run_recipe(recipe, resume: bool | str = False, overwrite: bool = False, log=print, stop_flag=None,
               **options) -> dict:
    """Run ``recipe`` with its workflow. ``resume``: continue from the latest checkpoint (or the
    one named); ``overwrite``: delete a previous run in ``train.output_dir`` first; ``stop_flag``:
    polled after every optimizer step, a True ends the run after a checkpoint; ``options``:
    workflow-specific keywords (multimodal ``cache_root``/``on_stage_end``, continual
    ``stop_after``). Returns the workflow's result with ``final_dir`` and ``workflow``."""
    wf = check_distributed(recipe, world_size())
    dist = None
    if wf.supports_distributed:
        from ..distributed import init_distributed

        dist = init_distributed(recipe.distributed)
    main = dist is None or dist.is_main
    out = Path(recipe.train.output_dir)
    try:
        if main:
            prepare_output_dir(out, wf, resume, overwrite)
        ctx = RunContext(resume=resume, overwrite=overwrite, log=log if main else _silent, stop_flag=stop_flag,
                         dist=dist, options=options)
        result = wf.run(recipe, ctx)
    finally:
        if dist is not None:
            from ..distributed import cleanup

            cleanup()
    result.setdefault("final_dir", None)
    result["workflow"] = wf.name
    return result


def eval_recipe(recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
    """``mmtune eval``: the recipe's workflow evaluates its trained model (or ``checkpoint``)."""
    return workflow_of(recipe).evaluate(recipe, checkpoint=checkpoint, max_new_tokens=max_new_tokens)
