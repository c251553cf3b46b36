"""The continual runner: the class-incremental ordering, resume, the report, recipes and errors."""

from __future__ import annotations

import json

import pytest

from mmtune.config import list_recipes, load_recipe, validate_recipe
from mmtune.continual import run_continual
from mmtune.errors import ConfigError, MMTuneError


def quiet(_):
    return None


def test_replay_beats_naive_class_incremental(make_recipe, tmp_path):
    """Fast version of the slow 5-seed check: 1 seed, 3 epochs per task."""
    naive = run_continual(make_recipe(tmp_path / "n", "naive", epochs=3), log=quiet)
    replay = run_continual(make_recipe(tmp_path / "r", "replay", {"buffer_size": 200}, epochs=3), log=quiet)
    # Naive fine-tuning keeps only the last task: ACC ~ 1/T, forgetting ~ 1.
    assert naive["metrics"]["acc"] == pytest.approx(0.2, abs=0.05)
    assert naive["metrics"]["forgetting"] > 0.9
    assert replay["metrics"]["acc"] > naive["metrics"]["acc"] + 0.35
    assert replay["metrics"]["forgetting"] < naive["metrics"]["forgetting"] - 0.35
    # R has one row per task, b one entry per task; the diagonal is learned.
    assert len(naive["R"]) == 5 and all(len(r) == 5 for r in naive["R"]) and len(naive["b"]) == 5
    assert min(naive["R"][i][i] for i in range(5)) > 0.7
    assert naive["metrics"]["fwt"] is None  # class-incremental: undefined


def test_resume_after_an_interrupted_sequence_gives_the_same_matrix(make_recipe, tmp_path):
    settings = {"buffer_size": 30, "on_disk": True}
    full = run_continual(make_recipe(tmp_path / "a", "derpp", settings, n_tasks=3, max_steps=15), log=quiet)
    part = run_continual(make_recipe(tmp_path / "b", "derpp", settings, n_tasks=3, max_steps=15), stop_after=2,
                         log=quiet)
    assert not part["finished"] and len(part["R"]) == 2 and "metrics" not in part
    state = json.loads((tmp_path / "b" / "continual" / "state" / "progress.json").read_text())
    assert len(state["R"]) == 2
    resumed = run_continual(make_recipe(tmp_path / "b", "derpp", settings, n_tasks=3, max_steps=15), resume=True,
                            log=quiet)
    assert resumed["finished"]
    assert resumed["b"] == full["b"]
    assert resumed["R"] == full["R"]  # bit-identical: same seeds, same memory, same stored logits
    assert resumed["metrics"] == full["metrics"]


def test_resume_refuses_a_changed_recipe_and_a_missing_state(make_recipe, tmp_path):
    run_continual(make_recipe(tmp_path, "naive", n_tasks=2, max_steps=3), stop_after=1, log=quiet)
    with pytest.raises(MMTuneError, match="recipe changed"):
        run_continual(make_recipe(tmp_path, "naive", n_tasks=2, max_steps=4), resume=True, log=quiet)
    with pytest.raises(MMTuneError, match="no finished task"):
        run_continual(make_recipe(tmp_path / "empty", "naive", n_tasks=2, max_steps=3), resume=True, log=quiet)


def test_report_files(make_recipe, tmp_path):
    res = run_continual(make_recipe(tmp_path, "replay", {"buffer_size": 20}, n_tasks=3, max_steps=10, report=True,
                                    curve_every=5), log=quiet)
    paths = res["report"]
    md = open(paths["markdown"]).read()
    assert "| after 3 |" in md and "Forgetting, max-based (Chaudhry 2018)" in md and "n/a" in md
    assert "Avalanche" in md and "![accuracy matrix](accuracy_matrix.png)" in md
    for key in ("heatmap", "curves"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads(open(paths["json"]).read())
    assert data["R"] == res["R"] and data["metrics"]["fwt"] is None
    assert data["metrics"]["acc"] == pytest.approx(sum(res["R"][-1]) / 3)
    # curve_every=5 with 10 steps per task: two evaluations of all tasks inside each task.
    assert [(c["task"], c["step"]) for c in data["curves"]] == [(t, s) for t in range(3) for s in (5, 10)]


def test_domain_incremental_defines_fwt(make_recipe, tmp_path):
    res = run_continual(make_recipe(tmp_path, "naive", scenario="domain", n_tasks=2, max_steps=10), log=quiet)
    assert res["metrics"]["fwt"] is not None
    assert res["b"][0] < 0.3  # untrained: about chance on ten classes


def test_task_incremental_masks_heads(make_recipe, tmp_path):
    res = run_continual(make_recipe(tmp_path, "naive", scenario="task", n_tasks=3, max_steps=20), log=quiet)
    # With the task id, naive fine-tuning keeps far more than in the class-incremental scenario.
    assert res["metrics"]["acc"] > 0.6


@pytest.mark.parametrize("name", ["continual-digits", "continual-text", "continual-multimodal"])
def test_shipped_recipes_load_and_name_their_command(name):
    from mmtune.config import resolve_recipe_path

    assert name in list_recipes()
    first = resolve_recipe_path(name).read_text().splitlines()[0]
    assert first == f"# mmtune continual {name}"
    recipe = load_recipe(name)
    assert recipe.continual is not None and len(recipe.continual.tasks) >= 3


def test_config_errors_name_the_field():
    base = {"benchmark": "digits", "tasks": [{"name": "a", "source": "digits:0,1"}]}
    with pytest.raises(ConfigError, match="unknown source"):
        validate_recipe({"continual": {**base, "tasks": [{"name": "a", "source": "mnist:0"}]}})
    with pytest.raises(ConfigError, match="unique"):
        validate_recipe({"continual": {**base, "tasks": [{"name": "a", "source": "digits:0"}] * 2}})
    with pytest.raises(ConfigError, match=r"tasks\.0\.source .* does not fit benchmark 'text'"):
        validate_recipe({"continual": {**base, "benchmark": "text"}})
    with pytest.raises(ConfigError, match="no `continual` section"):
        run_continual(validate_recipe({}), log=quiet)
