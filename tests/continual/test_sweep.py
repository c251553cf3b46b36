"""``mmtune continual sweep``: one report over strategies and seeds, the paired comparison, the CLI
and the benchmark script that wraps it."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from mmtune.cli import main
from mmtune.continual.sweep import paired_difference, parse_strategies
from mmtune.continual.sweep_report import run_sweep

TINY = ['continual.tasks=[{name: a, source: "digits:0,1"}, {name: b, source: "digits:2,3"}]', "train.max_steps=4"]


def test_sweep_writes_one_report_with_every_strategy(tmp_path):
    res = run_sweep("continual-digits", ["naive", "replay+lwf"], [0, 1], tmp_path, overrides=TINY, log=lambda s: None)
    results, paths = res["results"], res["report"]
    assert list(results) == ["naive", "replay+lwf"] and all(len(rows) == 2 for rows in results.values())
    md = Path(paths["markdown"]).read_text()
    for name, rows in results.items():
        accs = [100 * r["acc"] for r in rows]
        cell = f"{statistics.fmean(accs):.1f} ± {statistics.pstdev(accs):.1f}"
        assert f"| {name} | 2 | {cell} |" in md  # the table row: mean ± population sd over the seeds
    assert "## ACC against naive, paired by seed" in md and "| replay+lwf | " in md
    assert "| strategy | loss | lwf | replay |" in md  # each member's term in its own column
    for key in ("heatmaps", "curves"):
        assert Path(paths[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(Path(paths["json"]).read_text())
    assert data["meta"]["seeds"] == [0, 1] and data["results"]["naive"][1]["R"] == results["naive"][1]["R"]
    assert (tmp_path / "runs" / "replay+lwf-seed1" / "tasks" / "02-b" / "metrics.jsonl").is_file()


def test_paired_difference_is_per_seed():
    res = {"a": [{"seed": s, "acc": v} for s, v in [(0, 0.5), (1, 0.7), (2, 0.6)]],
           "b": [{"seed": s, "acc": v} for s, v in [(2, 0.9), (0, 0.6), (1, 0.75)]]}
    d = paired_difference(res, "b", "a")
    diffs = [0.1, 0.05, 0.3]
    assert d["n"] == 3 and d["mean"] == pytest.approx(statistics.fmean(diffs))
    assert d["sd"] == pytest.approx(statistics.stdev(diffs)) and d["t"] == pytest.approx(d["mean"] / (d["sd"] / 3**0.5))
    assert parse_strategies(" replay, replay+lwf ,gem") == ["replay", "replay+lwf", "gem"]


def test_cli_sweep_and_its_errors(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["continual", "sweep", "continual-digits", *TINY, "--strategies", "naive,gem", "--seeds", "2",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| gem | 2 |" in printed and f"report: {out / 'sweep.md'}" in printed
    assert json.loads((out / "sweep.json").read_text())["meta"]["seeds"] == [0, 1]
    assert main(["continual", "sweep", "continual-digits", *TINY, "--strategies", "replay+replya",
                 "--output", str(tmp_path / "x")]) == 2
    assert "Did you mean 'replay'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # checked before any run
    assert main(["continual", "continual-digits", "--strategies", "naive"]) == 2
    assert "--strategies belongs to `mmtune continual sweep" in capsys.readouterr().err
    assert main(["continual", "sweep"]) == 2


def test_benchmark_script_is_the_sweep(tmp_path):
    path = Path(__file__).parents[2] / "benchmarks" / "continual_digits.py"
    spec = importlib.util.spec_from_file_location("continual_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reports = mod.main(["train.max_steps=2", "--scenarios", "domain", "--strategies", "naive", "--seeds", "1",
                        "--output", str(tmp_path)])
    md = Path(reports["domain"]["markdown"]).read_text()
    assert "domain-incremental, 1 seed" in md and "| naive | 1 |" in md
