"""Every shipped recipe through `mmtune.cli.main` (issue 12): train on tiny settings, `--resume`
continues, `--overwrite` restarts, `mmtune eval` reports metrics, and the result loads for chat
where the workflow makes a chat model. A second parametrisation runs each workflow with
`--nproc 2`, or checks its one-line refusal.

The shrinking keeps each recipe's objective, adapter, template, workflow and data sources: only
steps, sizes and (for the real SmolLM2 / tiny-pretrained bases) the base model change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmtune.cli import main
from mmtune.config import list_recipes, load_yaml, resolve_recipe_path, validate_recipe

RECIPES = sorted(list_recipes())
ENCODER_TINY = dict(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1)


def _limit(sources, n):
    for src in sources or []:
        src["max_records"] = min(int(src.get("max_records") or n), n)


def shrink(name: str, out: Path, steps: int) -> dict:
    """Recipe ``name`` with ``steps`` optimizer steps (per stage / task) and tiny data."""
    data = load_yaml(resolve_recipe_path(name))
    workflow = validate_recipe(load_yaml(resolve_recipe_path(name))).resolved_workflow
    train = data.setdefault("train", {})
    for key in ("epochs", "warmup_ratio", "eval_every", "eval_prompts", "sample_every"):
        train.pop(key, None)
    train.update(output_dir=str(out), max_steps=steps, batch_size=2, grad_accum=1, save_every=1, warmup_steps=0,
                 progress=False, tensorboard=False, log_every=1)
    model = data.setdefault("model", {})
    if str(model.get("path", "")).startswith(("builtin:tiny-pretrained", "builtin:smollm2")):
        model["path"] = "builtin:tiny"  # the cached builds take minutes; the code path is the same
    d = data.setdefault("data", {})
    _limit(d.get("sources"), 16)
    _limit(d.get("eval_sources"), 8)
    if workflow == "encoder":
        d["max_length"] = min(int(d.get("max_length", 64)), 48)
        if "encoder" in data and str(model.get("path", "")).startswith("builtin:"):
            data["encoder"].update({k: v for k, v in ENCODER_TINY.items() if k in data["encoder"] or True})
    if workflow == "causal" and not d.get("eval_sources"):  # pretrain: eval on its own corpus
        d["eval_sources"] = [dict(src, max_records=8) for src in d["sources"]]
    if workflow == "multimodal":
        stages = data["multimodal"]["stages"]
        for stage in stages:
            stage["max_steps"] = steps
            _limit(stage.get("sources"), 4)
            _limit(stage.get("eval_sources"), 2)
        if not any(stage.get("eval_sources") for stage in stages):
            stages[-1]["eval_sources"] = [dict(src, max_records=2) for src in stages[-1]["sources"]]
    if workflow == "continual":
        c = data["continual"]
        for task in c.get("tasks", []):
            for key, n in (("train_size", 8), ("eval_size", 4), ("seen_eval_size", 4)):
                if key in task:
                    task[key] = min(int(task[key]), n)
        c.pop("general", None)
    return data


def write(data: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def metrics_steps(out: Path) -> list[int]:
    """Optimizer steps logged in the run's metrics.jsonl (all stages / tasks)."""
    rows = [json.loads(line) for p in sorted(out.rglob("metrics.jsonl")) for line in p.read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r and "step" in r]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_resumes_overwrites_and_evaluates(name, tmp_path, capsys):
    out = tmp_path / "run"
    workflow = validate_recipe(load_yaml(resolve_recipe_path(name))).resolved_workflow
    first = write(shrink(name, out, 2), tmp_path / "a.yaml")
    assert main(["train", first]) == 0, capsys.readouterr().err
    capsys.readouterr()
    steps = metrics_steps(out)
    assert steps, "no training step logged"
    # a second plain run refuses to mix with the first, in one line
    assert main(["train", first]) != 0
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    if workflow in ("causal", "encoder"):
        # more steps: the run continues from its last checkpoint, steps 1-2 are not redone
        longer = write(shrink(name, out, 3), tmp_path / "b.yaml")
        assert main(["train", longer, "--resume"]) == 0, capsys.readouterr().err
        assert metrics_steps(out) == steps + [3]
    else:
        # stages / tasks: the recipe is fingerprinted, a finished run resumes to nothing new
        assert main(["train", first, "--resume"]) == 0, capsys.readouterr().err
        assert metrics_steps(out) == steps
    capsys.readouterr()
    assert main(["train", first, "--overwrite"]) == 0, capsys.readouterr().err
    assert metrics_steps(out) == steps  # started over: the old log is gone
    capsys.readouterr()
    assert main(["eval", first]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out.lower()
    assert any(w in text for w in ("exact", "acc", "loss", "f1", "spearman")), text
    if workflow in ("causal", "multimodal"):  # the result is a chat model (terminal, web, serve)
        from mmtune.inference.models import load_chat_model
        from mmtune.inference.session import ChatSession
        from mmtune.inference.turns import GenerationSettings

        session = ChatSession(load_chat_model(str(out / "final")))
        reply = session.send("What is 2 + 3?", settings=GenerationSettings(max_new_tokens=4, temperature=0.0))
        text = "".join(reply)
        assert reply.finish_reason in ("stop", "length") and reply.prompt_tokens > 0
        assert reply.completion_tokens >= 1 or reply.finish_reason == "stop", text
        assert session.messages()[-1] == {"role": "assistant", "content": text}


def _workflows() -> list[tuple[str, str]]:
    """(workflow, its first shipped recipe) for every registered workflow."""
    from mmtune.registry import WORKFLOWS

    first: dict[str, str] = {}
    for name in RECIPES:
        first.setdefault(validate_recipe(load_yaml(resolve_recipe_path(name))).resolved_workflow, name)
    assert set(first) == set(WORKFLOWS.names()), "a workflow has no shipped recipe"
    return sorted(first.items())


@pytest.mark.parametrize(("workflow", "name"), _workflows())
def test_every_workflow_with_two_processes(workflow, name, tmp_path, capsys):
    """`--nproc 2`: a workflow that joins a process group trains data-parallel (both ranks step,
    rank 0 writes the final directory); the others refuse in one line and launch nothing."""
    from mmtune.registry import WORKFLOWS

    out = tmp_path / "run"
    recipe = write(shrink(name, out, 2), tmp_path / "a.yaml")
    code = main(["train", recipe, "--nproc", "2"])
    err = capsys.readouterr().err
    if WORKFLOWS.get(workflow).supports_distributed:
        assert code == 0, err
        assert (out / "final").is_dir() and metrics_steps(out) == [1, 2]
    else:
        assert code == 2 and not out.exists()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "--nproc" in lines[0] and "one process" in lines[0], lines
