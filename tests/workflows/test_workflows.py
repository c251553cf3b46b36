"""The workflow registry and the one runner: every workflow is registered under its schema name,
declares whether it trains data-parallel, and `mmtune train` / `continual` / `eval` reach it."""

from __future__ import annotations

import pytest

from mmtune.cli import main
from mmtune.config import WORKFLOW_NAMES
from mmtune.errors import MMTuneError
from mmtune.registry import WORKFLOWS
from mmtune.workflows.base import Workflow

CONTINUAL_TINY = ["continual.tasks=[{name: a, source: 'digits:0,1'}, {name: b, source: 'digits:2,3'}]",
                  "continual.digits_net.hidden=16", "train.epochs=1", "train.batch_size=64", "continual.report=false"]


def test_every_schema_workflow_is_registered():
    assert WORKFLOWS.names() == sorted(WORKFLOW_NAMES)
    for name in WORKFLOW_NAMES:
        wf = WORKFLOWS.get(name)
        assert issubclass(wf, Workflow) and wf.name == name
        assert isinstance(wf.supports_distributed, bool) and wf.run_files
    assert [n for n in WORKFLOW_NAMES if WORKFLOWS.get(n).supports_distributed] == ["causal"]


def test_continual_recipe_runs_through_train_and_continual_and_evaluates(tmp_path, capsys):
    out = [f"train.output_dir={tmp_path}", *CONTINUAL_TINY]
    assert main(["train", "continual-digits", *out]) == 0  # `train` on a continual recipe: the continual workflow
    assert (tmp_path / "continual" / "state" / "progress.json").is_file()
    assert main(["continual", "continual-digits", *out]) == 2  # a fresh run refuses to mix with the old one
    assert "--overwrite" in capsys.readouterr().err
    assert main(["continual", "continual-digits", *out, "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["eval", "continual-digits", *out]) == 0
    text = capsys.readouterr().out
    assert "tasks_done: 2" in text and "acc: " in text and "bwt: " in text


def test_continual_command_refuses_other_workflows(capsys):
    assert main(["continual", "quickstart"]) == 2
    assert "mmtune train quickstart" in capsys.readouterr().err


def test_overwrite_deletes_only_the_workflow_files(tmp_path):
    from mmtune.workflows.run import prepare_output_dir

    wf = WORKFLOWS.get("multimodal")()
    (tmp_path / "stages" / "01-a").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MMTuneError, match="already holds a multimodal run"):
        prepare_output_dir(tmp_path, wf, resume=False, overwrite=False)
    prepare_output_dir(tmp_path, wf, resume=False, overwrite=True)
    assert not (tmp_path / "stages").exists() and (tmp_path / "notes.txt").read_text() == "mine"


def test_one_builtin_resolver_knows_every_builtin_model():
    from mmtune.models.loading import BUILTIN_MODELS as listed
    from mmtune.registry import BUILTIN_MODELS

    assert sorted(n.split(":", 1)[1] for n in listed) == BUILTIN_MODELS.names()
    BUILTIN_MODELS.load_all()
    assert sorted(BUILTIN_MODELS._items) == BUILTIN_MODELS.names()  # every lazy entry registers its builder
