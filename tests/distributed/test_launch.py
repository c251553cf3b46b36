"""``launch(nproc, argv)``: re-runs a command in N processes under torch.distributed.run; a
failing rank stops the whole run (the others are not left waiting) and its error is shown."""

from __future__ import annotations

import time

import pytest

from mmtune.distributed import first_failure, launch, report_error, strip_nproc
from mmtune.errors import MMTuneError

# A stand-in for mmtune.cli: joins the group, records its rank and arguments; in "fail" mode
# rank 1 raises a user error while rank 0 waits in a barrier that rank 1 never reaches.
FAKE_CLI = '''
import sys
from pathlib import Path

import torch.distributed as dist

from mmtune.distributed import cleanup, init_distributed, report_error
from mmtune.errors import MMTuneError

out, mode = Path(sys.argv[1]), sys.argv[2]
ctx = init_distributed()
(out / f"rank{ctx.rank}.txt").write_text(f"{ctx.world_size} {' '.join(sys.argv[1:])}")
try:
    if mode == "fail" and ctx.rank == 1:
        raise MMTuneError("data.jsonl:3: missing field 'output'")
    if mode == "fail":
        dist.barrier()
except MMTuneError as e:
    report_error(e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
cleanup()
'''


def _fake(tmp_path):
    (tmp_path / "fake_cli.py").write_text(FAKE_CLI)
    return {"PYTHONPATH": str(tmp_path)}


def test_strip_nproc():
    assert strip_nproc(["train", "r.yaml", "--nproc", "2", "train.lr=1e-4"]) == ["train", "r.yaml", "train.lr=1e-4"]
    assert strip_nproc(["train", "--nproc=4", "r.yaml"]) == ["train", "r.yaml"]


def test_report_error_is_read_back(tmp_path, monkeypatch):
    f = tmp_path / "logs" / "run" / "attempt_0" / "1" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(f))
    report_error(MMTuneError("train.jsonl:7: bad record"))
    assert first_failure(tmp_path / "logs") == (1, "train.jsonl:7: bad record")
    assert first_failure(tmp_path / "nothing") is None


@pytest.mark.distributed
def test_launch_runs_every_rank(tmp_path):
    env = _fake(tmp_path)
    assert launch(2, [str(tmp_path), "ok", "--nproc", "2"], module="fake_cli", env=env) == 0
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"2 {tmp_path} ok"


@pytest.mark.distributed
def test_failing_rank_stops_the_run_with_its_error(tmp_path):
    env = _fake(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(MMTuneError, match=r"rank 1 of 2 failed: data.jsonl:3: missing field 'output'"):
        launch(2, [str(tmp_path), "fail"], module="fake_cli", env=env)
    # Rank 0 was blocked in a barrier (the collective timeout is 30 min): torchrun stopped it.
    assert time.perf_counter() - t0 < 120
