"""Helpers for the multi-process tests: run a plan of training runs in N processes (see
worker.py). Exposed as the ``dist`` fixture (the suite imports test files with
--import-mode=importlib, so helpers travel through fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

WORKER = Path(__file__).with_name("worker.py")


def run_plan(tmp_path: Path, runs: list[dict], nproc: int = 2, timeout: float = 300) -> dict:
    """Run ``runs`` with ``python -m torch.distributed.run --nproc_per_node nproc worker.py`` and
    return rank 0's results; fails the test with the ranks' output when the run fails."""
    plan = {"tmp": str(tmp_path), "out": str(tmp_path / "results.json"), "runs": runs}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(tmp_path / "plan.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{nproc}-process run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads((tmp_path / "results.json").read_text())


def assert_close_curves(a: list[float], b: list[float], tol: float = 1e-5) -> None:
    """Equal within ``tol`` for values up to 1 and within ``tol`` relative above (fp32 sums over
    differently sharded gradients round differently: a gradient norm of 2.09 measured 1.6e-5 apart
    on this machine's kernels, 7.6e-6 relative)."""
    assert len(a) == len(b), (a, b)
    diffs = [abs(x - y) / max(1.0, abs(x), abs(y)) for x, y in zip(a, b)]
    assert max(diffs) <= tol, f"curves differ by up to {max(diffs):.2e} (relative above 1):\n{a}\n{b}"


def saved_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a run's last checkpoint (adapter or full model)."""
    from safetensors.torch import load_file

    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    files = sorted((ckpts[-1] / "model").glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def dist():
    return SimpleNamespace(run_plan=run_plan, assert_close_curves=assert_close_curves, saved_weights=saved_weights)


@pytest.fixture(scope="session")
def worker():
    """The worker module (tiny model, rows, QLoRA builder), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmtune_test_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
