"""Continual-learning test helpers: small Split-Digits recipes (the fixture ``make_recipe``)."""

from __future__ import annotations

import pytest

from mmtune.config import validate_recipe

PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def digits_recipe(out, strategy: str = "naive", settings: dict | None = None, *, scenario: str = "class",
                  n_tasks: int = 5, epochs: float = 3, max_steps: int | None = None, seed: int = 0,
                  net: dict | None = None, train: dict | None = None, **continual):
    if scenario == "domain":
        tasks = [{"name": f"perm{i}", "source": f"digits-permuted:{i}"} for i in range(n_tasks)]
    else:
        tasks = [{"name": f"{a}-{b}", "source": f"digits:{a},{b}"} for a, b in PAIRS[:n_tasks]]
    tr = dict(output_dir=str(out), seed=seed, epochs=epochs, batch_size=32, lr=1e-3, scheduler="constant",
              warmup_ratio=0.0, max_grad_norm=None, progress=False, tensorboard=False, log_every=1)
    if max_steps is not None:
        tr["max_steps"] = max_steps
    tr.update(train or {})
    cc = {"benchmark": "digits", "scenario": scenario, "tasks": tasks, "torch_threads": 1, "report": False,
          "strategy": {"name": strategy, "settings": _keyed(strategy, settings)}, **continual}
    if net:
        cc["digits_net"] = net
    return validate_recipe({"train": tr, "continual": cc})


def _keyed(strategy: str, settings: dict | None) -> dict:
    """One strategy: its settings; a composition `a+b`: settings already keyed by strategy name."""
    if "+" in strategy:
        return dict(settings or {})
    return {strategy: settings or {}}


@pytest.fixture
def make_recipe():
    """``make_recipe(out, strategy, settings, scenario=..., n_tasks=..., max_steps=...)`` -> a Recipe."""
    return digits_recipe
