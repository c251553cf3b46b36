"""`mmtune train RECIPE` (kept import path): :func:`run_recipe` is the one runner of
:mod:`mmtune.workflows.run`, and the causal-LM set-up lives in :mod:`mmtune.workflows.causal`.

The final weights go to ``OUTPUT/final`` (same layout as a checkpoint), which ``mmtune export``,
``merge``, ``chat`` and ``eval`` take.
"""

from __future__ import annotations

from ..registry import ENCODER_OBJECTIVES
from ..workflows.causal import (  # noqa: F401 - the causal workflow's builders, under their old names
    build_causal_data,
    build_preference_data,
    make_dpo_objective,
    make_generate_fn,
)
from ..workflows.run import check_distributed, prepare_output_dir, run_recipe  # noqa: F401

CAUSAL_OBJECTIVES = {"sft", "pretrain", "dpo", "sft-fused"}


def is_encoder_objective(name: str) -> bool:
    return name in ENCODER_OBJECTIVES
