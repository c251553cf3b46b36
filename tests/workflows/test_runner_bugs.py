"""Bugs the four parallel run set-ups had (issue 12), one test each, through the one runner."""

from __future__ import annotations

import pytest

from mmtune.cli import main
from mmtune.config import load_recipe, load_yaml, resolve_recipe_path, validate_recipe
from mmtune.errors import ConfigError, MMTuneError

ENC_TINY = ["encoder.hidden_size=32", "encoder.num_heads=2", "encoder.intermediate_size=64", "encoder.num_layers=1",
            "train.progress=false", "train.tensorboard=false", "train.batch_size=8", "train.warmup_steps=0",
            "model.path=builtin:bert-tiny", "adapter.type=none", "train.max_steps=2", "data.max_length=48",
            "data.sources=[{path: 'builtin:encoder-topics', max_records: 32}]",
            "data.eval_sources=[{path: 'builtin:encoder-topics-eval', max_records: 16}]"]


def quiet(*_a, **_k):
    pass


def mm_tiny(out, steps=1) -> dict:
    data = load_yaml(resolve_recipe_path("mm-phi4-speech"))
    data["train"].update(output_dir=str(out), max_steps=steps, batch_size=2, save_every=1, progress=False,
                         warmup_steps=0, tensorboard=False)
    for stage in data["multimodal"]["stages"]:
        for src in stage["sources"] + stage.get("eval_sources", []):
            src["max_records"] = 4
    return data


def test_eval_encoder_recipe_with_checkpoint(tmp_path, capsys):
    """`mmtune eval encoder-classify --checkpoint DIR` crashed (eval_encoder got `checkpoint`)."""
    out = tmp_path / "run"
    assert main(["train", "encoder-classify", *ENC_TINY, f"train.output_dir={out}"]) == 0
    capsys.readouterr()
    # a checkpoint elsewhere: the run's own output dir is gone, the recipe still names it
    moved = tmp_path / "kept"
    (out / "final").rename(moved)
    assert main(["eval", "encoder-classify", *ENC_TINY, f"train.output_dir={out}", "--checkpoint", str(moved)]) == 0
    text = capsys.readouterr().out
    assert "accuracy:" in text and str(moved) in text
    # a training checkpoint (step-N/ holds model/ and tokenizer/) works too
    step = sorted((out / "checkpoints").iterdir())[-1]
    assert main(["eval", "encoder-classify", *ENC_TINY, f"train.output_dir={out}", "--checkpoint", str(step)]) == 0
    assert "accuracy:" in capsys.readouterr().out


def test_overwrite_reaches_a_multimodal_run(tmp_path):
    """`--overwrite` was dropped for multimodal recipes: the second run refused."""
    from mmtune.train.run import run_recipe

    recipe = validate_recipe(mm_tiny(tmp_path / "mm"))
    first = run_recipe(recipe, log=quiet)
    with pytest.raises(MMTuneError, match="--overwrite"):
        run_recipe(recipe, log=quiet)
    again = run_recipe(recipe, overwrite=True, log=quiet)
    assert again["final_dir"] == first["final_dir"] and not again["stopped"]
    assert [s["steps"] for s in again["stages"]] == [1, 1]


@pytest.mark.parametrize("name", ["encoder-classify", "mm-phi4-speech", "continual-digits"])
def test_nproc_refuses_workflows_without_a_process_group(name, capsys):
    """`--nproc N` ran N identical copies of these workflows; now one clear line, nothing launched."""
    assert main(["train", name, "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nproc" in err[0] and "one process" in err[0], err


def test_nproc_refused_under_torchrun_too(monkeypatch):
    from mmtune.train.run import run_recipe

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(MMTuneError, match="one process"):
        run_recipe(load_recipe("encoder-classify"), log=quiet)


def test_web_stop_and_log_reach_a_multimodal_run(tmp_path):
    """The Train tab's Stop button and live log never reached a multimodal run."""
    from mmtune.serve.train_job import TrainJob

    recipe = validate_recipe(mm_tiny(tmp_path / "mm", steps=50))
    job = TrainJob(recipe, source="mm")
    assert job.can_stop
    job._stop.set()  # pressed before the first step ends: the run stops after it
    job.start()
    assert job.join(120), "the run did not stop"
    assert job.state == "stopped", job.error
    assert any("[stage 1/2]" in line for line in job.lines), list(job.lines)
    assert job.result["stages"][-1]["steps"] == 1


def test_encoder_lora_with_a_string_target():
    """`adapter.targets: query` failed inside PEFT on the encoder path (a string is a regex there)."""
    from mmtune.config import AdapterConfig
    from mmtune.encoders.models import apply_adapter, load_hf_model

    recipe = load_recipe("encoder-classify", ENC_TINY)
    hf, _ = load_hf_model(recipe.model, "base", _tokenizer(), 48, recipe.encoder)
    net = apply_adapter(hf, AdapterConfig(type="lora", r=2, alpha=4, targets="query"), lora_attr=None,
                        always_train=[], from_scratch=False)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained and all(".query.lora_" in n for n in trained), sorted(trained)[:4]


def _tokenizer():
    from mmtune.encoders.tokenizer import train_tokenizer

    return train_tokenizer(["a tiny corpus for a tiny tokenizer"] * 8, "wordpiece", 120, True)


def test_mistyped_freeze_pattern_is_an_error_on_the_encoder_path():
    from mmtune.encoders.run import build_encoder_module, prepare

    recipe = load_recipe("encoder-classify", ENC_TINY + ["model.freeze=['bert.embedings.*']"])
    with pytest.raises(ConfigError, match="model.freeze pattern 'bert.embedings.\\*' matches no parameter"):
        build_encoder_module(recipe, prepare(recipe))
    ok = load_recipe("encoder-classify", ENC_TINY + ["model.freeze=['backbone.embeddings.*']"])
    module = build_encoder_module(ok, prepare(ok))
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and all(".embeddings." in n for n in frozen)


@pytest.mark.parametrize("name,setting", [
    ("encoder-classify", "data.packing=false"), ("encoder-classify", "data.on_bad_record=skip"),
    ("encoder-classify", "data.num_proc=2"), ("bert-mlm-nsp", "data.packing=false"),
    ("mm-phi4-speech", "data.sources=[{path: x.jsonl}]")])
def test_settings_a_workflow_ignores_are_errors_naming_them(name, setting):
    key = setting.split("=", 1)[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(name, [setting])
