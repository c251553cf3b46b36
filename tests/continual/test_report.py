"""Plasticity, intransigence and the "never learned" flag: forgetting is read beside how well each
task was learned (issue 17 item 3)."""

from __future__ import annotations

import json

import pytest

from mmtune.continual import run_continual
from mmtune.continual.metrics import intransigence, load_reference, plasticity, summarize, unlearned_tasks
from mmtune.continual.report import markdown
from mmtune.errors import ConfigError

# A run that barely learned tasks 1 and 2 (diagonal 0.15, 0.20): its forgetting (0.05) looks good.
LOW = [[0.15, 0.0, 0.0],
       [0.10, 0.20, 0.0],
       [0.10, 0.15, 0.90]]
GOOD = [[0.95, 0.0, 0.0],
        [0.60, 0.90, 0.0],
        [0.40, 0.50, 0.92]]


def test_plasticity_intransigence_and_unlearned_by_hand():
    assert plasticity(LOW) == pytest.approx((0.15 + 0.20 + 0.90) / 3)
    joint = [0.99, 0.97, 0.95]
    assert intransigence(LOW, joint) == pytest.approx(((0.99 - 0.15) + (0.97 - 0.20) + (0.95 - 0.90)) / 3)
    assert intransigence(LOW, None) is None
    assert unlearned_tasks(LOW) == [0, 1] and unlearned_tasks(GOOD) == []
    assert unlearned_tasks(LOW, threshold=0.1) == []
    m = summarize(LOW, [0.1] * 3, reference=joint, learned_threshold=0.5)
    assert m["diagonal"] == pytest.approx([0.15, 0.20, 0.90]) and m["unlearned_tasks"] == [0, 1]
    # The low forgetting of the unlearned run is what the flag is for.
    assert m["forgetting"] < summarize(GOOD)["forgetting"]
    with pytest.raises(ValueError, match="one accuracy per task"):
        intransigence(LOW, [0.9, 0.9])


def _result(R, **metrics_kw):
    return {"tasks": ["a", "b", "c"], "strategy": "l2p", "benchmark": "digits", "scenario": "class", "b": [0.0] * 3,
            "R": R, "metrics": summarize(R, None, fwt_defined=False, **metrics_kw), "strategy_state": {}}


def test_report_flags_a_run_that_never_learned():
    md = markdown(_result(LOW))
    assert "**Never learned**" in md and "a (0.150), b (0.200)" in md
    assert "| a | 0.150 (never learned) |" in md and "| c | 0.900 |" in md
    assert "Plasticity (accuracy when learned) | 0.417" in md
    good = markdown(_result(GOOD, reference=[1.0, 1.0, 1.0]))
    assert "Never learned" not in good and "never learned" not in good
    assert "Intransigence (Chaudhry 2018) | 0.077" in good


def test_run_reports_plasticity_and_a_reference_from_a_joint_run(make_recipe, tmp_path):
    joint = run_continual(make_recipe(tmp_path / "joint", "joint", n_tasks=2, max_steps=15, report=True),
                          log=lambda s: None)
    ref_file = tmp_path / "joint" / "metrics.json"
    assert json.loads(ref_file.read_text())["metrics"]["plasticity"] == pytest.approx(joint["metrics"]["plasticity"])
    # A learning rate too small to learn anything: flagged, and the intransigence against joint is large.
    logs: list[str] = []
    res = run_continual(make_recipe(tmp_path / "stuck", "naive", n_tasks=2, max_steps=3, report=True,
                                    train={"lr": 1e-9}, intransigence_reference=str(ref_file)), log=logs.append)
    m = res["metrics"]
    assert m["unlearned_tasks"] == [0, 1]
    assert m["intransigence"] == pytest.approx(joint["metrics"]["plasticity"] - m["plasticity"])
    assert m["intransigence"] > 0.4
    assert any("never learned" in x for x in logs)
    assert "**Never learned**" in open(res["report"]["markdown"]).read()


def test_reference_must_match_the_tasks(tmp_path):
    assert load_reference([0.9, 0.8], 2) == [0.9, 0.8]
    with pytest.raises(ConfigError, match="3 accuracies for 2 tasks"):
        load_reference([0.9, 0.8, 0.7], 2)
    with pytest.raises(ConfigError, match="no such file"):
        load_reference(str(tmp_path / "missing.json"), 2)
