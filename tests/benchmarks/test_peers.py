"""benchmarks/peers.py: the job's data has the length spread it claims, the harness counts what it
says (real tokens without padding, supervised tokens after the first position), the summary skips
the warm-up step, and runner labels with recipe overrides parse. The runs themselves need the
peers' virtualenvs and minutes per run (``python benchmarks/peers.py --install``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def peers(load_benchmark):
    return load_benchmark("peers")


def test_chat_records_have_a_long_tail(peers):
    recs = peers.chat_records(600, seed=0)
    assert len(recs) == 600 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in recs)
    lengths = [sum(len(m["content"]) for m in r["messages"]) for r in recs]
    q = statistics.quantiles(lengths, n=10)
    # log-normal: the 90th percentile several times the median, the median above the 10th percentile
    assert q[-1] > 2 * statistics.median(lengths) and statistics.median(lengths) > 1.5 * q[0]
    assert peers.chat_records(600, seed=0) == recs  # the same job every run
    assert peers.chat_records(600, seed=1) != recs


def test_meter_counts_real_and_supervised_tokens(peers, tmp_path):
    spec = {"t_spawn": 0.0, "result": str(tmp_path / "r.json")}
    meter = peers.Meter(spec)

    def collate(feats):  # right-padded to 5
        ids = torch.zeros(len(feats), 5, dtype=torch.long)
        labels = torch.full((len(feats), 5), -100)
        for i, f in enumerate(feats):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
        return {"input_ids": ids, "labels": labels}

    wrapped = meter.wrap_collate(collate)
    meter.step_begin()
    wrapped([{"input_ids": [1, 2, 3], "labels": [7, 8, 9]}, {"input_ids": [4, 5, 6, 7, 8], "labels": [-100] * 4 + [3]}])
    meter.step_end(1.5)
    # 3 + 5 real tokens (not 10 padded positions); supervised: labels != -100 after position 0: 2 + 1
    assert meter.steps[0]["tokens"] == 8 and meter.steps[0]["supervised"] == 3
    meter.write()
    out = json.loads(Path(spec["result"]).read_text())
    assert out["steps"][0]["loss"] == 1.5 and out["startup_s"] > 0


def test_summary_skips_the_warm_up_step_and_table_ratios(peers):
    res = {"steps": [{"seconds": 100.0, "tokens": 10, "supervised": 5, "loss": 3.0},
                     {"seconds": 2.0, "tokens": 400, "supervised": 100, "loss": 2.0},
                     {"seconds": 2.0, "tokens": 400, "supervised": 100, "loss": 1.0}],
           "startup_s": 4.0, "peak_rss_gb": 2.0, "rc": 0}
    s = peers.summarise(res)
    assert s["tokens_per_s"] == 200 and s["supervised_per_s"] == 50 and s["final_loss"] == 1.0
    slow = {**s, "tokens_per_s": 100.0}
    text = peers.table({"mmtune": [s], "trl": [slow]})
    assert "| mmtune | 200 |" in text and "| 2.00 |" in text and "| 1.00 |" in text


def test_runner_labels(peers):
    assert peers.parse_runner("trl") == ("trl", {})
    assert peers.parse_runner("mmtune:train.fused_loss=false+data.packing=false") == (
        "mmtune", {"train.fused_loss": "false", "data.packing": "false"})
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        peers.parse_runner("mmtune:train.compile")
    with pytest.raises(SystemExit):
        peers.parse_runner("axolotl")
    with pytest.raises(SystemExit):
        peers.parse_runner("trl:packing=true")
