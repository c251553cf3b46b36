"""`mmtune demo` runs end to end and writes its report (quick mode; the full run is `make demo`)."""

import json

import pytest


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    from mmtune.demo import run_demo

    scores = run_demo(str(tmp_path), quick=True, log=lambda *a, **k: None)
    assert set(scores) == {"random init", "after pretraining", "after LoRA SFT"}
    report = (tmp_path / "report.md").read_text()
    assert "| **all** |" in report and "mmtune chat" in report
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["after LoRA SFT"]["n"] == 12
