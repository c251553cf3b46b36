"""`mmtune train` end to end on the tiny model: kill after step k, --resume, same losses."""

import json
from pathlib import Path

import pytest

from mmtune.config import load_recipe
from mmtune.errors import MMTuneError
from mmtune.train.metrics_log import read_metrics
from mmtune.train.run import run_recipe

OVERRIDES = ["model.path=builtin:tiny", "adapter.type=lora", "adapter.dropout=0.1", "data.max_length=128",
             "train.max_steps=6", "train.batch_size=2", "train.save_every=2", "train.progress=false",
             "train.eval_prompts=[]", "data.eval_sources=[]", "train.tensorboard=false"]


class Crash(Exception):
    pass


def quiet(*a, **k):
    pass


def test_kill_and_resume_gives_the_same_losses(tmp_path):
    full = run_recipe(load_recipe("quickstart", OVERRIDES + [f"train.output_dir={tmp_path / 'a'}"]), log=quiet)
    recipe = load_recipe("quickstart", OVERRIDES + [f"train.output_dir={tmp_path / 'b'}"])
    calls = {"n": 0}

    def crash_after_5():
        calls["n"] += 1
        if calls["n"] == 5:
            raise Crash  # as if the process died during step 6
        return False

    with pytest.raises(Crash):
        run_recipe(recipe, log=quiet, stop_flag=crash_after_5)
    # no half-written checkpoint is visible; the latest complete one is step 4
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    with pytest.raises(MMTuneError, match="--resume"):
        run_recipe(recipe, log=quiet)  # a fresh run refuses to mix with the old one
    resumed = run_recipe(recipe, resume=True, log=quiet)
    assert len(resumed["losses"]) == len(full["losses"]) == 6
    for a, b in zip(full["losses"], resumed["losses"]):
        assert abs(a - b) <= 1e-6
    assert full["losses"][-1] < full["losses"][0]
    meta = json.loads((Path(resumed["final_dir"]) / "meta.json").read_text())
    assert meta["adapter"] == "lora" and Path(meta["base_model"]).is_dir()
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert steps[-1] == 6


def test_overwrite_starts_fresh(tmp_path):
    recipe = load_recipe("quickstart", OVERRIDES + [f"train.output_dir={tmp_path}", "train.max_steps=2"])
    run_recipe(recipe, log=quiet)
    res = run_recipe(recipe, overwrite=True, log=quiet)
    assert res["steps"] == 2
    assert len([r for r in read_metrics(tmp_path) if "loss" in r]) == 2
