"""EWC's two conventions (issue 17 item 5): mmtune's (per-example Fisher, max-normalised,
(lambda/2) penalty) and Avalanche 0.6's ``EWCPlugin`` (squared mini-batch gradients over the whole
task, no normalisation, lambda penalty), and the guard switched off explicitly."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mmtune.continual import run_continual
from mmtune.continual.benchmarks import DigitsBenchmark
from mmtune.continual.nets import DigitsMLP
from mmtune.continual.runner import build_strategy


def _ewc(make_recipe, tmp_path, settings, batch_size=32):
    recipe = make_recipe(tmp_path, "ewc", settings, n_tasks=2, max_steps=5, train={"batch_size": batch_size})
    bench = DigitsBenchmark(recipe.continual)
    return bench, build_strategy(recipe, bench, torch.device("cpu"), tmp_path, log=lambda s: None)


def avalanche_importances(model, rows, batch_size):
    """Avalanche 0.6 ``EWCPlugin.compute_importances`` re-implemented: for each mini-batch of the
    experience, the squared gradient of the mean cross-entropy, summed, divided by the number of
    mini-batches (the last, short one included)."""
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    model.eval()
    for b in batches:
        model.zero_grad()
        x = torch.stack([r["x"] for r in b])
        y = torch.tensor([r["y"] for r in b])
        F.cross_entropy(model(x).logits, y).backward()
        for n, p in model.named_parameters():
            imp[n] += p.grad.detach() ** 2
    return {n: v / len(batches) for n, v in imp.items()}


def test_avalanche_convention_fisher_matches_avalanche(make_recipe, tmp_path):
    bench, ewc = _ewc(make_recipe, tmp_path, {"convention": "avalanche"}, batch_size=24)
    torch.manual_seed(0)
    model = DigitsMLP(64, 32, 1, 10)
    rows = bench.tasks[0].train
    assert len(rows) % 24 != 0  # a short last batch, weighed as Avalanche does
    order = random.Random()
    order.setstate(ewc.rng.getstate())
    idx = order.sample(range(len(rows)), len(rows))  # the order the strategy draws (all rows)
    ewc.before_task(model, bench.tasks[0].info)
    fisher = ewc.fisher(model, rows)
    ref = avalanche_importances(model, [rows[i] for i in idx], 24)
    for n in ref:
        assert torch.allclose(fisher[n], ref[n], rtol=1e-5, atol=1e-12), n
    # Not normalised: far below the max-normalised Fisher's 1.
    assert max(float(f.max()) for f in fisher.values()) < 0.5


@pytest.mark.parametrize("convention,factor", [("mmtune", 0.5), ("avalanche", 1.0)])
def test_penalty_factor_of_each_convention(make_recipe, tmp_path, convention, factor):
    bench, ewc = _ewc(make_recipe, tmp_path, {"convention": convention, "lambda": 3.0, "fisher_samples": 40})
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    ewc.before_task(model, bench.tasks[0].info)
    ewc.after_task(model, bench.tasks[0].info, bench.tasks[0].train)
    ewc.before_task(model, bench.tasks[1].info)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    fisher, anchor = ewc.penalties[0]
    manual = sum(float((fisher[n] * (p.detach() - anchor[n]) ** 2).sum()) for n, p in model.named_parameters())
    batch = bench.collate(bench.tasks[1].train[:8])
    term = ewc.loss_terms(batch, ewc.ctx.objective(model, batch))["ewc"]
    assert float(term) == pytest.approx(factor * 3.0 * manual, rel=1e-5)


def test_guard_false_keeps_a_stiff_lambda(make_recipe, tmp_path):
    """lambda 1e9 stops with an error under the guard (test_strategies); guard: false trains with it."""
    res = run_continual(make_recipe(tmp_path, "ewc", {"lambda": 1e9, "fisher_samples": 32, "guard": False},
                                    n_tasks=2, max_steps=10), log=lambda s: None)
    assert res["finished"] and res["strategy_state"]["events"] == [] and res["strategy_state"]["scale"] == 1.0


def test_stiffness_counts_the_missing_half_under_avalanche(make_recipe, tmp_path):
    """The penalty's curvature is 2 lambda F without the 1/2: the suggested lambda is half mmtune's."""
    from mmtune.errors import MMTuneError

    r = make_recipe(tmp_path, "ewc", {"lambda": 1e12, "convention": "avalanche", "fisher_norm": "max",
                                      "fisher_samples": 32, "fisher_batch_size": 1}, n_tasks=2, max_steps=5)
    with pytest.raises(MMTuneError, match=r"lambda to at most 1000\b"):
        run_continual(r, log=lambda s: None)
