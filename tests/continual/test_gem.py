"""GEM: the exact dual QP solver against a reference solver and the KKT conditions, the projection
keeps every past task's memory loss from rising, and GEM beats naive fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mmtune.continual import run_continual
from mmtune.continual.benchmarks import DigitsBenchmark
from mmtune.continual.nets import DigitsMLP
from mmtune.continual.runner import build_strategy
from mmtune.continual.strategies.qp import kkt_residual, solve_gem_dual, solve_nonneg_qp


def _reference(P: np.ndarray, c: np.ndarray, margin: float) -> np.ndarray:
    """scipy's bounded quasi-Newton solver (L-BFGS-B) on min 1/2 v'Pv + c'v, v >= margin."""
    t = len(c)
    res = minimize(lambda v: 0.5 * v @ P @ v + c @ v, np.full(t, margin + 0.1), jac=lambda v: P @ v + c,
                   bounds=[(margin, None)] * t, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000})
    return res.x


def _gem_instance(g: torch.Generator, t: int, p: int, collinear: bool = False):
    G = torch.randn(t, p, generator=g, dtype=torch.float64)
    if collinear and t > 1:
        G[1] = 2.0 * G[0] + 1e-6 * torch.randn(p, generator=g, dtype=torch.float64)  # nearly parallel rows
    grad = torch.randn(p, generator=g, dtype=torch.float64)
    P = G @ G.T + 1e-3 * torch.eye(t, dtype=torch.float64)
    return G, grad, P, G @ grad


def test_dual_qp_matches_a_reference_solver_and_meets_kkt_on_random_instances():
    g = torch.Generator().manual_seed(0)
    worst_kkt, worst_gap, active = 0.0, 0.0, 0
    for i in range(60):
        t = 1 + i % 9
        G, grad, P, c = _gem_instance(g, t, int(torch.randint(t, 60, (1,), generator=g)) + 1, collinear=i % 7 == 0)
        margin = (0.0, 0.5)[i % 2]
        v = solve_gem_dual(P, c, margin)
        worst_kkt = max(worst_kkt, kkt_residual(P, c, margin, v))
        Pn, cn = P.numpy(), c.numpy()
        ref = _reference(Pn, cn, margin)
        ours = v.numpy()
        gap = (0.5 * ours @ Pn @ ours + cn @ ours) - (0.5 * ref @ Pn @ ref + cn @ ref)
        worst_gap = max(worst_gap, gap)  # never worse than the reference
        active += int((v > margin + 1e-9).sum() not in (0, t))  # instances with a mixed active set
    assert worst_kkt < 1e-8
    assert worst_gap < 1e-9
    assert active > 10  # the instances exercise the active-set steps, not only all-free / all-bound


def test_dual_qp_closed_forms():
    # One constraint: v = max(margin, -c / P).
    P, c = torch.tensor([[4.0]]), torch.tensor([-2.0])
    assert float(solve_gem_dual(P, c, 0.0)) == pytest.approx(0.5)
    assert float(solve_gem_dual(P, c, 0.8)) == pytest.approx(0.8)
    # Nothing to push against (c >= 0): every variable stays at its bound.
    P = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    assert torch.equal(solve_nonneg_qp(P, torch.tensor([1.0, 0.0], dtype=torch.float64)), torch.zeros(2, dtype=torch.float64))
    # Unconstrained optimum inside the feasible set: u = -P^-1 d.
    d = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    assert torch.allclose(solve_nonneg_qp(P, d), torch.linalg.solve(P, -d))


def _gem_with_memories(make_recipe, tmp_path, settings: dict, n_tasks: int = 3):
    recipe = make_recipe(tmp_path, "gem", settings, n_tasks=n_tasks, max_steps=5)
    bench = DigitsBenchmark(recipe.continual)
    gem = build_strategy(recipe, bench, torch.device("cpu"), tmp_path, log=lambda s: None)
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    for task in bench.tasks[: n_tasks - 1]:
        gem.before_task(model, task.info)
        gem.after_task(model, task.info, task.train)
    gem.before_task(model, bench.tasks[-1].info)
    return gem, bench, model


def _memory_grads(gem, model) -> torch.Tensor:
    params = list(model.parameters())
    return torch.stack([gem.memory_gradient(model, params, rows) for rows in gem.memories])  # (t, p)


def _set_grad(model, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_gem_projection_solves_the_primal_qp(make_recipe, tmp_path):
    """With margin 0 and eps 0, the projected gradient z is the primal solution of eq. 12:
    G z >= 0 (no past memory loss rises to first order), z - g = G^T v with v >= 0, and
    v_k (G z)_k = 0 -- the KKT conditions of min ||z - g||^2 s.t. G z >= 0."""
    gem, bench, model = _gem_with_memories(make_recipe, tmp_path, {"patterns_per_task": 30, "memory_strength": 0.0,
                                                                   "eps": 0.0})
    assert [len(m) for m in gem.memories] == [30, 30]
    G = _memory_grads(gem, model)
    g = -G[0] + 0.2 * G[1]  # conflicts with task 1's memory
    assert float(G[0] @ g) < 0
    _set_grad(model, g)
    gem.after_backward(model)
    z = _flat_grad(model)
    Gz = G @ z
    assert float(Gz.min()) > -1e-5 * float(G.norm() * g.norm())
    v = torch.linalg.lstsq(G.T.double(), (z - g).double().unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose((G.T.double() @ v).float(), z - g, atol=1e-5)  # z - g lies in the span of G's rows
    assert float(v.min()) > -1e-6
    assert float((v * Gz.double()).abs().max()) < 1e-4 * float(G.norm() * g.norm())
    assert gem.projections == 1 and gem.steps == 1
    # No conflict: the gradient is left exactly as it was.
    g2 = G.sum(0)
    _set_grad(model, g2)
    gem.after_backward(model)
    assert torch.equal(_flat_grad(model), g2) and gem.projections == 1 and gem.steps == 2


def test_gem_margin_biases_the_step_towards_the_memories(make_recipe, tmp_path):
    """memory_strength m > 0 (the authors' margin): v >= m, so z = g + G^T v with every v_k >= m."""
    gem, bench, model = _gem_with_memories(make_recipe, tmp_path, {"patterns_per_task": 20, "memory_strength": 0.5,
                                                                   "eps": 0.0})
    G = _memory_grads(gem, model)
    g = -G[0] - G[1]
    _set_grad(model, g)
    gem.after_backward(model)
    z = _flat_grad(model)
    v = torch.linalg.lstsq(G.T.double(), (z - g).double().unsqueeze(1)).solution.squeeze(1)
    assert float(v.min()) >= 0.5 - 1e-4
    assert float((G @ z).min()) > 0  # strictly lowers both memory losses to first order


def test_gem_state_round_trip(make_recipe, tmp_path):
    gem, bench, model = _gem_with_memories(make_recipe, tmp_path, {"patterns_per_task": 10})
    state = gem.state_dict()
    fresh, _, _ = _gem_with_memories(make_recipe, tmp_path / "b", {"patterns_per_task": 10}, n_tasks=3)
    fresh.memories = []
    fresh.load_state_dict(state)
    assert [[r["y"] for r in m] for m in fresh.memories] == [[r["y"] for r in m] for m in gem.memories]
    assert fresh.rng.getstate() == gem.rng.getstate()


def test_gem_beats_naive_class_incremental(make_recipe, tmp_path):
    """Fast check (3 tasks, 3 epochs, 1 seed); the 5-seed numbers come from the sweep (tests/continual/test_slow.py)."""
    naive = run_continual(make_recipe(tmp_path / "n", "naive", n_tasks=3, epochs=3), log=lambda s: None)
    gem = run_continual(make_recipe(tmp_path / "g", "gem", {"patterns_per_task": 40}, n_tasks=3, epochs=3),
                        log=lambda s: None)
    assert naive["metrics"]["acc"] < 0.45
    assert gem["metrics"]["acc"] > naive["metrics"]["acc"] + 0.35
    st = gem["strategy_state"]
    assert 0 < st["projections"] <= st["steps"]
