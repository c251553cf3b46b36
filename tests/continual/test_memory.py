"""Rehearsal memory (issue 17 item 6): equal memory for every memory strategy of a shipped
comparison, DER++'s top-k logits for language models, and the memory stated in bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmtune.config import list_recipes, load_recipe
from mmtune.continual import run_continual
from mmtune.continual.benchmarks import DigitsBenchmark
from mmtune.continual.buffer import item_nbytes
from mmtune.continual.nets import DigitsMLP
from mmtune.continual.runner import build_strategy
from mmtune.continual.strategies import STRATEGIES

from .test_text import text_recipe

CONTINUAL_RECIPES = [n for n in list_recipes() if n.startswith("continual-")]


@pytest.mark.parametrize("name", CONTINUAL_RECIPES)
def test_memory_strategies_of_a_shipped_recipe_get_equal_memory(name):
    """Comparing replay with 24 examples to DER++ with its default 200 is not a comparison."""
    st = load_recipe(name).continual.strategy
    sizes = {}
    for s in STRATEGIES.names():
        cls = STRATEGIES.get(s)
        if "buffer_size" in cls.Settings.model_fields:
            sizes[s] = cls.parse_settings(st.settings.get(s) or {}).buffer_size
    assert len(set(sizes.values())) == 1, sizes


def test_item_nbytes_counts_tensors_at_their_dtype():
    item = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "task": 0, "_logits": torch.zeros(2, 64, dtype=torch.float16),
            "_logit_idx": torch.zeros(2, 64, dtype=torch.int32), "name": "x"}
    assert item_nbytes(item) == {"input_ids": 24, "labels": 24, "task": 8, "_logits": 256, "_logit_idx": 512}


def test_derpp_on_text_keeps_the_top_k_logits_of_each_token(tmp_path):
    recipe = text_recipe(tmp_path, "derpp", steps=2)
    recipe.continual.strategy.settings["derpp"] = {"buffer_size": 8, "logits_top_k": 16, "logits_dtype": "float16"}
    res = run_continual(recipe, log=lambda s: None)
    model, der_state = res["model"], res["strategy_state"]
    state = torch.load(tmp_path / "continual" / "state" / "strategy.pt", weights_only=False)
    items = state["buffer"]["store"]["items"]
    item = items[0]
    n = sum(1 for x in item["labels"][1:] if x != -100)
    assert item["_logits"].shape == (n, 16) and item["_logits"].dtype == torch.float16
    assert item["_logit_idx"].shape == (n, 16) and item["_logit_idx"].dtype == torch.int32
    # The memory the report states: 16 x (2 + 4) bytes per supervised token instead of 4 x vocab.
    nb = der_state["buffer"]["bytes"]
    tokens = sum(sum(1 for x in it["labels"][1:] if x != -100) for it in items) / len(items)
    assert nb["fields"]["_logits"] == pytest.approx(tokens * 16 * 2)
    assert nb["fields"]["_logit_idx"] == pytest.approx(tokens * 16 * 4)
    assert model.config.vocab_size > 16


def test_derpp_top_k_mse_is_over_the_stored_units(make_recipe, tmp_path):
    recipe = make_recipe(tmp_path, "derpp", {"buffer_size": 10, "logits_top_k": 3, "alpha": 1.0, "beta": 0.0},
                         n_tasks=2, max_steps=2)
    bench = DigitsBenchmark(recipe.continual)
    der = build_strategy(recipe, bench, torch.device("cpu"), tmp_path, log=lambda s: None)
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    der.before_task(model, bench.tasks[0].info)
    der.after_task(model, bench.tasks[0].info, bench.tasks[0].train)
    items = der.buffer.items()
    x = torch.stack([it["x"] for it in items])
    full = model(x).logits.detach()
    top = full.topk(3, dim=-1)
    assert torch.allclose(torch.cat([it["_logits"] for it in items]), top.values, atol=1e-6)
    assert torch.equal(torch.cat([it["_logit_idx"] for it in items]).long(), top.indices)
    der.before_task(model, bench.tasks[1].info)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    state = der.rng.getstate()
    term = der.loss_terms({}, None)["der_logits"].detach()
    der.rng.setstate(state)
    with torch.no_grad():
        now = model(x).logits
    # All 10 items are sampled (batch 32 > 10), so the MSE is over every stored unit.
    assert float(term) == pytest.approx(float(F.mse_loss(now.gather(1, top.indices), top.values)), rel=1e-5)


def test_digits_derpp_keeps_every_logit_and_reports_its_memory(make_recipe, tmp_path):
    res = run_continual(make_recipe(tmp_path, "derpp", {"buffer_size": 20}, n_tasks=2, max_steps=3, report=True),
                        log=lambda s: None)
    nb = res["strategy_state"]["buffer"]["bytes"]
    assert nb["fields"]["_logits"] == 10 * 4 and "_logit_idx" not in nb["fields"]  # 10 classes < top-k 64
    assert nb["per_example"] == pytest.approx(64 * 4 + 8 + 8 + 40)  # x fp32, y, task, logits
    assert f"{nb['per_example']:,.0f} bytes per example" in open(res["report"]["markdown"]).read()
