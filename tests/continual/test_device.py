"""The model and every tensor a strategy keeps live on the run's device (the meta device stands in
for CUDA: a tensor left on the CPU fails there exactly as it would on a GPU)."""

from __future__ import annotations

import pytest
import torch

from mmtune.continual.benchmarks import DigitsBenchmark
from mmtune.continual.runner import build_strategy, prepare_model

META = torch.device("meta")


def _meta_run(make_recipe, tmp_path, name: str, settings: dict | None = None):
    recipe = make_recipe(tmp_path, name, settings, n_tasks=2, max_steps=2)
    bench = DigitsBenchmark(recipe.continual)
    strategy = build_strategy(recipe, bench, META, tmp_path, log=lambda s: None)
    model = prepare_model(bench, strategy, META)
    return bench, strategy, model


def test_zscl_teacher_moves_with_the_model(make_recipe, tmp_path):
    bench, zscl, model = _meta_run(make_recipe, tmp_path, "zscl", {"reference_size": 8, "batch_size": 4})
    assert all(p.device == META for p in model.parameters())
    assert zscl.teacher.params and all(v.device == META for v in zscl.teacher.params.values())
    zscl.before_task(model, bench.tasks[0].info)
    batch = zscl.to_device(bench.collate(bench.tasks[0].train[:4]))
    outputs = zscl.ctx.objective(model, batch)
    terms = zscl.loss_terms(batch, outputs)  # the teacher's forward on the reference batch
    assert terms["zscl"].device == META


@pytest.mark.parametrize("name", ["task_lora", "olora"])
def test_adapters_built_in_setup_live_on_the_device(make_recipe, tmp_path, name):
    recipe_scenario = {"scenario": "task"} if name == "task_lora" else {}
    recipe = make_recipe(tmp_path, name, n_tasks=2, max_steps=2, **recipe_scenario)
    bench = DigitsBenchmark(recipe.continual)
    strategy = build_strategy(recipe, bench, META, tmp_path, log=lambda s: None)
    model = prepare_model(bench, strategy, META)
    assert all(p.device == META for p in model.parameters())
