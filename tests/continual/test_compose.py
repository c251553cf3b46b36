"""Composed strategies (``continual.strategy: [replay, lwf]``): the recipe forms, the terms add up
(each equal to the member's own term and logged under its name), and a composition trains
differently from each member alone."""

from __future__ import annotations

import json

import pytest
import torch

from mmtune.config import load_recipe, validate_recipe
from mmtune.continual import run_continual
from mmtune.continual.benchmarks import DigitsBenchmark
from mmtune.continual.nets import DigitsMLP
from mmtune.continual.runner import build_strategy
from mmtune.continual.strategies.compose import Composite
from mmtune.errors import ConfigError

BASE = {"benchmark": "digits", "tasks": [{"name": "a", "source": "digits:0,1"}]}


def _strategy(raw):
    return validate_recipe({"continual": {**BASE, "strategy": raw}}).continual.strategy


def test_recipe_forms_of_a_composition():
    listed = _strategy([{"name": "replay", "settings": {"buffer_size": 50}}, "lwf"])
    plus = _strategy({"name": "replay+lwf", "settings": {"replay": {"buffer_size": 50}}})
    names = _strategy({"name": ["replay", "lwf"], "settings": {"replay": {"buffer_size": 50}}})
    for s in (listed, plus, names):
        assert s.names == ["replay", "lwf"] and s.label == "replay+lwf"
        assert s.settings_for("replay") == {"buffer_size": 50} and s.settings_for("lwf") == {}
    single = _strategy({"name": "ewc", "settings": {"ewc": {"lambda": 5}}})
    assert single.name == "ewc" and single.names == ["ewc"] and single.chosen_settings() == {"lambda": 5}
    assert _strategy(["ewc"]).name == "ewc"  # a one-item list is the single strategy
    with pytest.raises(ConfigError, match="Did you mean 'lambda'"):
        _strategy([{"name": "ewc", "settings": {"lamda": 5}}, "replay"])
    with pytest.raises(ConfigError, match="Did you mean 'replay'"):
        _strategy(["replya", "lwf"])
    with pytest.raises(ConfigError, match="lists a strategy twice"):
        _strategy("replay+replay")
    with pytest.raises(ConfigError, match="agem and gem both edit gradients"):
        _strategy(["agem", "gem"])
    with pytest.raises(ConfigError, match=r"item 1 must be a strategy name or \{name"):
        _strategy(["replay", {"nam": "lwf"}])
    # From the command line: `continual.strategy.name=replay+ewc` on the shipped recipe.
    r = load_recipe("continual-digits", ["continual.strategy.name=replay+ewc"])
    assert r.continual.strategy.names == ["replay", "ewc"]


def _composite_and_members(make_recipe, tmp_path, names: list[str]):
    """A composite of ``names`` and a lone strategy per name, all built from the same recipe, after task 1."""
    settings = {"replay": {"buffer_size": 40}, "ewc": {"fisher_samples": 16}, "lwf": {}}
    recipe = make_recipe(tmp_path, "+".join(names), {n: settings[n] for n in names}, n_tasks=2, max_steps=4)
    bench = DigitsBenchmark(recipe.continual)
    comp = build_strategy(recipe, bench, torch.device("cpu"), tmp_path / "c", log=lambda s: None)
    alone = []
    for n in names:
        r = make_recipe(tmp_path, n, settings[n], n_tasks=2, max_steps=4)
        alone.append(build_strategy(r, bench, torch.device("cpu"), tmp_path / n, log=lambda s: None))
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    t0, t1 = bench.tasks[0], bench.tasks[1]
    for s in (comp, *alone):
        s.before_task(model, t0.info)
        s.after_task(model, t0.info, t0.train)
        s.before_task(model, t1.info)
    with torch.no_grad():  # away from the anchor / teacher, so that every term is non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return comp, alone, bench, model


@pytest.mark.parametrize("names", [["replay", "lwf"], ["replay", "ewc"]])
def test_composite_terms_are_the_members_terms(make_recipe, tmp_path, names):
    comp, alone, bench, model = _composite_and_members(make_recipe, tmp_path, names)
    assert isinstance(comp, Composite) and comp.name == "+".join(names)
    batch = bench.collate(bench.tasks[1].train[:16])
    out = comp.ctx.objective(model, batch)
    terms = comp.loss_terms(batch, out)
    own = {}
    for s in alone:
        own.update(s.loss_terms(batch, out))
    assert set(terms) == set(own) == {"replay", names[1]}
    for k in terms:  # each member draws from its own seeded RNG: exactly the lone strategy's value
        assert float(terms[k].detach()) == pytest.approx(float(own[k].detach()), rel=1e-6)
        assert float(terms[k].detach()) > 1e-4
    state = comp.state_dict()
    assert set(state) == set(names)
    comp.load_state_dict(state)


def _task2_log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "tasks" / "02-2-3" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("second", ["lwf", "ewc"])
def test_composition_trains_differently_from_each_member_and_logs_each_term(make_recipe, tmp_path, second):
    settings = {"replay": {"buffer_size": 40}, "ewc": {"fisher_samples": 32, "lambda": 1000}, "lwf": {}}
    runs = {}
    for label in ("replay", second, f"replay+{second}"):
        names = label.split("+")
        given = {n: settings[n] for n in names} if len(names) > 1 else settings[label]
        r = make_recipe(tmp_path / label, label, given, n_tasks=2, max_steps=12)
        runs[label] = run_continual(r, log=lambda s: None)
        logged = {k for row in _task2_log(tmp_path / label) for k in row}
        assert set(names) <= logged  # every member's term is logged under its own name
        assert set(runs[label]["terms"][1]) >= {"loss", *names}  # and summarised per task in the result
    both = runs[f"replay+{second}"]
    assert both["strategy"] == f"replay+{second}"
    assert runs["replay"]["losses"][0] == both["losses"][0]  # task 1: no term yet, the same steps
    for alone in ("replay", second):
        a, b = runs[alone]["model"].state_dict(), both["model"].state_dict()
        assert any(not torch.allclose(a[k], b[k]) for k in a), alone
        assert runs[alone]["losses"][1] != both["losses"][1]
    # The composite's terms are on the same scale as each member's own term.
    for name in ("replay", second):
        x, y = runs[name]["terms"][1][name], both["terms"][1][name]
        assert 0.2 < y / x < 5.0
