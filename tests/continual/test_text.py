"""The text task sequence on the tiny model: plumbing of the LM objective, DER++ logits per token,
per-task LoRA routing on a causal LM (a few optimizer steps; the statistics are in test_slow.py)."""

from __future__ import annotations

import torch

from mmtune.config import load_recipe
from mmtune.continual import run_continual
from mmtune.continual.benchmarks import TextBenchmark
from mmtune.continual.objectives import ContinualLMObjective


def text_recipe(tmp_path, strategy: str, steps: int = 2):
    r = load_recipe("continual-text", [f"train.output_dir={tmp_path}", f"train.max_steps={steps}",
                                       f"continual.strategy.name={strategy}", "continual.report=false",
                                       "train.batch_size=4", "continual.max_new_tokens=4"])
    for t in r.continual.tasks:
        t.train_size, t.eval_size = 8, 4
    r.continual.tasks = r.continual.tasks[:2]
    return r


def test_lm_objective_flattens_supervised_positions(tmp_path):
    bench = TextBenchmark(text_recipe(tmp_path, "naive"), text_recipe(tmp_path, "naive").continual)
    from mmtune.models.loading import load_model

    model = load_model(bench.recipe.model, bench.recipe.adapter)
    batch = bench.collate(bench.tasks[0].train[:3])
    out = ContinualLMObjective(features=True)(model, batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert out.outputs.logits.shape == (n, model.config.vocab_size)
    assert out.outputs.features.shape == (n, model.config.hidden_size)
    assert int(out.count) == n
    # The flattened logits are the full logits at the shifted supervised positions, row-major.
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b, t = torch.nonzero(batch["labels"][:, 1:] != -100, as_tuple=True)
    assert torch.allclose(out.outputs.logits, full[b, t].float(), atol=1e-5)


def test_derpp_on_text_stores_per_token_logits(tmp_path):
    res = run_continual(text_recipe(tmp_path, "derpp", steps=2), log=lambda s: None)
    assert res["finished"] and len(res["R"]) == 2
    state = torch.load(tmp_path / "continual" / "state" / "strategy.pt", weights_only=False)
    item = state["buffer"]["store"]["items"][0]
    n = sum(1 for x in item["labels"][1:] if x != -100)
    assert item["_logits"].shape[0] == n  # one row per supervised token of that example


def test_task_lora_on_the_tiny_lm_routes_by_task_id(tmp_path):
    res = run_continual(text_recipe(tmp_path, "task_lora", steps=3), log=lambda s: None)
    model = res["model"]
    assert set(model.peft_config) == {"task0", "task1"}
    # Training task 2 never changed task 1's adapter: its row of R is unchanged.
    assert res["R"][1][0] == res["R"][0][0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".task1." in n for n in trainable)  # the last task's adapter only
