"""The ``multimodal`` workflow: vision/audio encoders composed with an LLM, trained stage by stage
(:mod:`mmtune.multimodal.run`); ``mmtune eval`` reports each stage's held-out loss."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.templates import get_template
from ..errors import MMTuneError
from ..multimodal.model import load_composed
from ..multimodal.run import evaluate_stages, find_composed, run_multimodal_recipe
from ..registry import WORKFLOWS
from ..train.objectives import objective_data
from .base import RunContext, Workflow


@WORKFLOWS.register("multimodal")
class MultimodalWorkflow(Workflow):
    name = "multimodal"
    run_files = ("stages", "final")

    def run(self, recipe, ctx: RunContext) -> dict:
        return run_multimodal_recipe(recipe, resume=bool(ctx.resume), overwrite=ctx.overwrite, log=ctx.log,
                                     stop_flag=ctx.stop_flag, **ctx.options)

    def evaluate(self, recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
        """``eval_loss/STAGE``: mean per-token loss of the composed model on each stage's
        ``eval_sources`` (``eval_loss``: over all of them), for ``sft``/``pretrain`` recipes."""
        target = checkpoint or str(Path(recipe.train.output_dir) / "final")
        found = find_composed(target)
        if found is None:
            raise MMTuneError(f"nothing to evaluate at {target}: no composed model (mmtune_composed.json) there; train "
                              "first or pass --checkpoint DIR (a run's final/ or stages/NN-NAME/composed)")
        if objective_data(recipe.objective) == "pairs":
            raise MMTuneError("mmtune eval on a multimodal DPO recipe: its held-out pair loss and reward margins are "
                              "logged per stage in stages/NN-NAME/metrics.jsonl during training")
        model = load_composed(found, device="cuda" if torch.cuda.is_available() else "cpu")
        template = get_template(recipe.data.template, model.tokenizer, recipe.data.system_prompt)
        metrics = evaluate_stages(recipe, model, template)
        if not metrics:
            raise MMTuneError("the recipe's stages have no eval_sources to evaluate on")
        return {**metrics, "model_dir": str(found)}
