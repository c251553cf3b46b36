"""The ``encoder`` workflow: BERT-family pretraining objectives and downstream heads
(:mod:`mmtune.encoders.run` builds the data, the network and the export)."""

from __future__ import annotations

from ..encoders.run import eval_encoder, run_encoder_recipe
from ..registry import WORKFLOWS
from .base import RunContext, Workflow


@WORKFLOWS.register("encoder")
class EncoderWorkflow(Workflow):
    name = "encoder"

    def run(self, recipe, ctx: RunContext) -> dict:
        return run_encoder_recipe(recipe, resume=ctx.resume, log=ctx.log, stop_flag=ctx.stop_flag)

    def evaluate(self, recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
        return eval_encoder(recipe, checkpoint=checkpoint)
