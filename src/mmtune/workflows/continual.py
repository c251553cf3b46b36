"""The ``continual`` workflow: an ordered sequence of tasks trained with a strategy, every task
evaluated after each (:mod:`mmtune.continual.runner`); ``mmtune eval`` reports the run's
accuracy matrix summary (ACC, BWT, FWT, forgetting) from its saved state."""

from __future__ import annotations

from pathlib import Path

from ..continual.metrics import summarize
from ..continual.runner import load_state, run_continual
from ..errors import MMTuneError
from ..registry import WORKFLOWS
from .base import RunContext, Workflow


@WORKFLOWS.register("continual")
class ContinualWorkflow(Workflow):
    name = "continual"
    run_files = ("tasks", "continual", "report.md", "metrics.json", "accuracy_matrix.png", "task_curves.png")

    def run(self, recipe, ctx: RunContext) -> dict:
        result = run_continual(recipe, resume=bool(ctx.resume), log=ctx.log, stop_flag=ctx.stop_flag, **ctx.options)
        result["stopped"] = not result["finished"]
        return result

    def evaluate(self, recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
        out = Path(checkpoint or recipe.train.output_dir)
        state = load_state(out / "continual")
        if state is None:
            raise MMTuneError(f"nothing to evaluate: no finished task saved in {out / 'continual' / 'state'}; run "
                              "`mmtune continual` first (or pass --checkpoint OUTPUT_DIR)")
        p = state["progress"]
        done, total = len(p["R"]), len(p["b"])
        out_metrics = {"tasks_done": done, "tasks": total}
        out_metrics.update({f"acc/{i + 1}": float(a) for i, a in enumerate(p["R"][-1])})
        if done == total:  # the summary of the accuracy matrix (class-incremental: no FWT, as in the run)
            metrics = summarize(p["R"], p["b"], fwt_defined=recipe.continual.scenario != "class")
            out_metrics.update({k: v for k, v in metrics.items() if isinstance(v, float)})
        return out_metrics
