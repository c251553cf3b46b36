"""LwF's convention against Avalanche 0.6's ``LwFPlugin`` (issue 17 item 4): mmtune's term is
alpha * T^2 * KL, Avalanche's alpha * KL, so mmtune's alpha a is Avalanche's 4a at T = 2; the
default (0.25) is Avalanche's default (1), which keeps plasticity on permuted Split-Digits."""

from __future__ import annotations

import pytest
import torch

from mmtune.continual.benchmarks import DigitsBenchmark
from mmtune.continual.nets import DigitsMLP
from mmtune.continual.runner import build_strategy
from mmtune.continual.strategies.distillation import LwFSettings


def avalanche_lwf_term(out, prev_out, alpha, temperature):
    """Avalanche 0.6 ``LwFPlugin._distillation_loss`` times alpha: KL(softmax(prev/T) || softmax(out/T)),
    batch mean, no T^2."""
    log_p = torch.log_softmax(out / temperature, dim=1)
    q = torch.softmax(prev_out / temperature, dim=1)
    return alpha * torch.nn.functional.kl_div(log_p, q, reduction="batchmean")


def test_default_alpha_is_avalanches_default():
    s = LwFSettings()
    assert s.alpha == 0.25 and s.temperature == 2.0
    assert s.alpha * s.temperature ** 2 == 1.0  # Avalanche LwFPlugin(alpha=1, temperature=2)


def test_lwf_term_equals_avalanche_with_alpha_times_t_squared(make_recipe, tmp_path):
    recipe = make_recipe(tmp_path, "lwf", {"alpha": 0.3, "temperature": 2.0}, scenario="domain", n_tasks=2,
                         max_steps=2)
    bench = DigitsBenchmark(recipe.continual)
    lwf = build_strategy(recipe, bench, torch.device("cpu"), tmp_path, log=lambda s: None)
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    lwf.before_task(model, bench.tasks[0].info)
    lwf.after_task(model, bench.tasks[0].info, bench.tasks[0].train)
    lwf.before_task(model, bench.tasks[1].info)
    batch = bench.collate(bench.tasks[1].train[:16])
    with torch.no_grad():
        old = model(batch["x"]).logits.clone()
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    term = lwf.loss_terms(batch, lwf.ctx.objective(model, batch))["lwf"].detach()
    ref = avalanche_lwf_term(model(batch["x"]).logits, old, alpha=0.3 * 4, temperature=2.0)
    assert float(term) == pytest.approx(float(ref), rel=1e-5)
    assert float(term) > 1e-4
