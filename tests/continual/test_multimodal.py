"""The modality-dynamic sequence (VQA -> OCR -> speech) on a composed model: what trains per task,
the per-modality and per-task adapters, replay across modalities (a few optimizer steps on the
random tiny LM; the accuracy matrices of the shipped recipe are in test_slow.py)."""

from __future__ import annotations

import json

import pytest
import torch

from mmtune.config import load_recipe
from mmtune.continual import run_continual
from mmtune.errors import ConfigError


def mm_recipe(tmp_path, strategy: str, steps: int = 2, **over):
    r = load_recipe("continual-multimodal", [f"train.output_dir={tmp_path}", f"train.max_steps={steps}",
                                             f"continual.strategy.name={strategy}", "continual.report=false",
                                             "model.path=builtin:tiny", "train.batch_size=2", "adapter.r=4",
                                             "adapter.alpha=8", *[f"{k}={v}" for k, v in over.items()]])
    for t in r.continual.tasks:
        t.train_size, t.eval_size = 4, 2
    return r


def test_per_modality_adapters_and_replay_across_modalities(tmp_path):
    res = run_continual(mm_recipe(tmp_path, "replay", **{"continual.strategy.settings.replay.buffer_size": 6}),
                        log=lambda s: None)
    model = res["model"]
    assert set(model.language_model.peft_config) == {"vision", "speech"}
    assert res["finished"] and len(res["R"]) == 3 and len(res["R"][0]) == 3
    assert res["metric_names"] == ["exact_match", "token_accuracy", "token_accuracy"]
    assert all(0.0 <= x <= 1.0 for row in res["R"] for x in row)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # The LM's base weights never train; encoders, projectors and both modality adapters do.
    assert not [n for n in trained if n.startswith("language_model.") and ".lora_" not in n]
    assert any(".lora_A.vision." in n for n in trained) and any(".lora_A.speech." in n for n in trained)
    assert any(n.startswith("vision_encoder.") for n in trained) and any(n.startswith("audio_encoder.") for n in trained)
    rows = [json.loads(x) for x in (tmp_path / "tasks" / "03-asr" / "metrics.jsonl").read_text().splitlines()]
    assert any("replay" in r for r in rows)  # the speech task replays stored image examples
    assert res["strategy_state"]["buffer"]["size"] == 6


def test_task_lora_gives_each_task_its_adapter_and_keeps_the_others(tmp_path):
    recipe = mm_recipe(tmp_path, "task_lora")
    part = run_continual(recipe, stop_after=2, log=lambda s: None)
    after_two = {n: p.detach().clone() for n, p in part["model"].named_parameters()}
    res = run_continual(recipe, resume=True, log=lambda s: None)  # the speech task, after a resume
    model = res["model"]
    assert res["finished"] and set(model.language_model.peft_config) == {"task0", "task1", "task2"}
    trained_lm = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("language_model.")}
    assert trained_lm and all(".task2." in n for n in trained_lm)  # the last task's adapter only
    # The speech task went through adapter task2 only: the image tasks' adapters did not move.
    old = [n for n in after_two if ".task0." in n or ".task1." in n]
    assert old and all(torch.equal(after_two[n], dict(model.named_parameters())[n].detach()) for n in old)
    assert any(not torch.equal(after_two[n], p.detach()) for n, p in model.named_parameters() if ".task2." in n)
    assert model.router.table["text"] is None  # text keeps the base model


def test_unsupported_strategy_and_scenario_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not available on the multimodal benchmark"):
        run_continual(mm_recipe(tmp_path, "lwf"), log=lambda s: None)
    with pytest.raises(ConfigError, match="modality-dynamic task-incremental"):
        run_continual(mm_recipe(tmp_path, "naive", **{"continual.scenario": "domain"}), log=lambda s: None)


def test_image_tasks_no_longer_refused():
    """Issue 17 item 8: `continual.tasks.0.modalities=[image]` used to say "image not supported"."""
    r = load_recipe("continual-multimodal", ["continual.tasks.0.modalities=[image]"])
    assert r.continual.tasks[0].modalities == ["image"]
    with pytest.raises(Exception, match="does not fit benchmark 'multimodal'"):
        load_recipe("continual-multimodal", ["continual.tasks.0.source=builtin:add"])
