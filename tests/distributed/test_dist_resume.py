"""A checkpoint written by 2 processes (FSDP2: sharded weights and optimizer state) resumes in 1
process, and one written by 1 process resumes in 2, continuing the loss curve of an
uninterrupted run within 1e-5. The 2-process runs use the same global batch (2 x 2 rows)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

STEPS, STOP = 6, 3
FSDP = {"strategy": "fsdp"}
RUNS = [
    {"name": "ref_lora", "phase": "pre", "adapter": "lora", "max_steps": STEPS},
    {"name": "ref_full", "phase": "pre", "adapter": "full", "max_steps": STEPS},
    # 1 -> 2: the first leg in one process, the rest in two.
    {"name": "one_lora", "phase": "pre", "adapter": "lora", "max_steps": STEPS, "stop_at": STOP},
    {"name": "one_then_two_lora", "phase": "dist", "adapter": "lora", "max_steps": STEPS, "distributed": FSDP,
     "resume": ["one_lora", STOP]},
    # 2 -> 1: the first leg in two processes, the rest in one (after the process group is gone).
    {"name": "two_lora", "phase": "dist", "adapter": "lora", "max_steps": STEPS, "stop_at": STOP,
     "distributed": FSDP},
    {"name": "two_full", "phase": "dist", "adapter": "full", "max_steps": STEPS, "stop_at": STOP,
     "distributed": FSDP},
    {"name": "two_then_one_lora", "phase": "post", "adapter": "lora", "max_steps": STEPS,
     "resume": ["two_lora", STOP]},
    {"name": "two_then_one_full", "phase": "post", "adapter": "full", "max_steps": STEPS,
     "resume": ["two_full", STOP]},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory, dist):
    tmp = tmp_path_factory.mktemp("resume")
    return dist.run_plan(tmp, RUNS)


def test_first_legs_stop_at_the_checkpoint(results):
    assert results["one_lora"]["steps"] == STOP and results["two_lora"]["steps"] == STOP
    assert results["two_lora"]["world"] == 2 and results["two_then_one_lora"]["world"] == 1


@pytest.mark.parametrize("run,ref", [("one_then_two_lora", "ref_lora"), ("two_then_one_lora", "ref_lora"),
                                     ("two_then_one_full", "ref_full")])
def test_resume_continues_the_uninterrupted_curve(results, dist, run, ref):
    losses = results[run]["losses"]  # the restored history of the first leg, then the new steps
    assert len(losses) == STEPS
    dist.assert_close_curves(results[ref]["losses"], losses)
