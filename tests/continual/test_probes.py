"""General-ability probes (issue 14 item 5): evaluated before and after every task, never trained."""

from __future__ import annotations

import pytest

from mmtune.continual import run_continual
from mmtune.continual.benchmarks import TextBenchmark
from mmtune.continual.config import ProbeConfig
from mmtune.continual.general import GENERAL, key_hit

from .test_text import text_recipe


def test_key_hit_takes_any_alternative_case_insensitively():
    assert key_hit("There are 7 days.", "seven|7") and key_hit("SEVEN days", "seven|7")
    assert not key_hit("six", "seven|7")
    assert len({q for q, _, _ in GENERAL}) == len(GENERAL) >= 20


def test_probes_form_a_matrix_beside_r_and_are_never_trained(tmp_path):
    recipe = text_recipe(tmp_path, "naive", steps=2)
    recipe.continual.probes = [ProbeConfig(name="chat", source="general:chat", size=6),
                               ProbeConfig(name="questions", source="general:questions", size=4)]
    recipe.continual.report = True
    res = run_continual(recipe, log=lambda s: None)
    assert res["probes"] == ["chat (loss)", "questions (contains)"]
    P = res["P"]
    assert len(P) == 3 and all(len(r) == 2 for r in P)  # before, after task 1, after task 2
    assert all(r[0] > 0 for r in P) and all(0 <= r[1] <= 1 for r in P)
    assert P[1][0] != P[0][0]  # training moved the chat loss
    # The loss probe is the mean token loss of the reference answers, as the objective computes it.
    bench = TextBenchmark(recipe, recipe.continual)
    rows = bench.probes[0]["rows"]
    out = bench.objective()(res["model"], bench.collate(rows))
    assert float(out.loss_sum / out.count) == pytest.approx(P[-1][0], rel=1e-4)
    md = open(res["report"]["markdown"]).read()
    assert "## Probes (evaluated, never trained)" in md and "| change |" in md
    # Never trained: no training row carries a probe's question.
    questions = {q for q, _, _ in GENERAL}
    assert not any(bench.tokenizer.decode(r["input_ids"]).count(q) for t in bench.tasks for r in t.train
                   for q in questions)
