"""The `mmtune` command: --help everywhere, one-line errors, config copy."""

import subprocess
import sys

import pytest

from mmtune.cli import build_parser, main

COMMANDS = ["train", "export", "merge", "chat", "serve", "web", "eval", "data", "config", "demo", "continual"]
COMMANDS += ["import-gguf", "export-gguf"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 100


def test_every_command_is_wired():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def test_recipe_typo_is_one_line(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtune: error:") and "train.lrr" in err and "Did you mean 'lr'" in err
    assert "Traceback" not in err


def test_missing_model_dir_is_one_line(tmp_path, capsys):
    assert main(["train", "quickstart", f"model.path={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_file_is_one_line(tmp_path, capsys):
    code = main(["train", "quickstart", f"data.sources.0.path={tmp_path / 'missing.jsonl'}",
                 f"train.output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_config_copy_and_list(tmp_path, capsys):
    assert main(["config", "list"]) == 0
    assert "quickstart" in capsys.readouterr().out
    dest = tmp_path / "mine.yaml"
    assert main(["config", "copy", "sft-lora", str(dest)]) == 0
    assert dest.read_text().startswith("# mmtune train sft-lora")
    assert main(["config", "copy", "sft-lora", str(dest)]) == 2  # refuses to overwrite


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mmtune.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "mmtune" in out.stdout
