"""Text tasks are scored on held-out items (issue 17 item 7): the benchmark measures how many
evaluation items are training items, the shipped recipe has none, and the report says so when a
recipe scores a task on its training pairs."""

from __future__ import annotations

import pytest

from mmtune.config import load_recipe
from mmtune.continual.benchmarks import TextBenchmark
from mmtune.continual.metrics import summarize
from mmtune.continual.report import markdown


def _bench(overrides=()):
    r = load_recipe("continual-text", ["model.path=builtin:tiny", *overrides])
    return TextBenchmark(r, r.continual)


def test_shipped_text_recipe_scores_held_out_items():
    bench = _bench()
    assert [t.eval_overlap for t in bench.tasks] == [0.0, 0.0, 0.0]
    for t in bench.tasks:
        assert len(t.eval) >= 20 and len(t.train) >= len(t.eval)


def test_scoring_on_the_training_pairs_is_measured_and_reported():
    bench = _bench([f"continual.tasks.{i}.eval_source=builtin:{n}" for i, n in enumerate(["add", "reverse", "capital"])]
                   + [f"continual.tasks.{i}.train_size=24" for i in range(3)]
                   + [f"continual.tasks.{i}.eval_size=24" for i in range(3)])
    assert [t.eval_overlap for t in bench.tasks] == pytest.approx([1.0, 1.0, 1.0])
    R = [[0.9, 0.1, 0.1], [0.5, 0.9, 0.1], [0.4, 0.4, 0.9]]
    md = markdown({"tasks": ["add", "reverse", "capital"], "strategy": "naive", "benchmark": "text",
                   "scenario": "task", "b": [0.0] * 3, "R": R, "metrics": summarize(R), "strategy_state": {},
                   "eval_overlap": [t.eval_overlap for t in bench.tasks]})
    assert "**Scored on training items**: add (100%), reverse (100%), capital (100%)" in md


def test_memorisation_matrix_beside_the_held_out_one(tmp_path):
    from mmtune.continual import run_continual

    from .test_text import text_recipe

    recipe = text_recipe(tmp_path, "naive", steps=2)
    recipe.continual.report = True
    res = run_continual(recipe, log=lambda s: None)
    assert len(res["R_seen"]) == 2 and all(len(r) == 2 for r in res["R_seen"]) and len(res["b_seen"]) == 2
    assert res["metrics_seen"]["plasticity"] == pytest.approx((res["R_seen"][0][0] + res["R_seen"][1][1]) / 2)
    md = open(res["report"]["markdown"]).read()
    assert "## Training items (memorisation)" in md and "Scored on training items" not in md
