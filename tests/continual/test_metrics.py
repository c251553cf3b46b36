"""Continual-learning metrics against hand-computed matrices (docs/reference/continual.md#accuracy-matrix-and-metrics)."""

import numpy as np
import pytest

from mmtune.continual.metrics import (
    avalanche_forgetting,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting_per_task,
    forward_transfer,
    max_forgetting,
    summarize,
)

# Task 1's accuracy rises after it was learned (0.90 -> 0.95), so the two forgettings differ.
R = [[0.90, 0.10, 0.20],
     [0.95, 0.80, 0.30],
     [0.75, 0.60, 0.95]]
B = [0.10, 0.05, 0.20]


def test_hand_computed_three_tasks():
    m = summarize(R, B)
    assert m["acc"] == pytest.approx((0.75 + 0.60 + 0.95) / 3)
    assert m["avg_incremental_acc"] == pytest.approx((0.90 + (0.95 + 0.80) / 2 + (0.75 + 0.60 + 0.95) / 3) / 3)
    assert m["bwt"] == pytest.approx(((0.75 - 0.90) + (0.60 - 0.80)) / 2)  # -0.175
    assert m["fwt"] == pytest.approx(((0.10 - 0.05) + (0.30 - 0.20)) / 2)  # 0.075
    # Chaudhry 2018: max over l in [j, T-1] of R[l][j], minus the final accuracy.
    assert m["forgetting_per_task"] == pytest.approx([0.95 - 0.75, 0.80 - 0.60])
    assert m["forgetting"] == pytest.approx(0.20)
    # Avalanche: accuracy right after learning minus final; = -BWT, and differs from the max-based one.
    assert m["avalanche_forgetting_per_task"] == pytest.approx([0.90 - 0.75, 0.80 - 0.60])
    assert m["avalanche_forgetting"] == pytest.approx(0.175)
    assert m["avalanche_forgetting"] == pytest.approx(-m["bwt"])
    assert m["forgetting"] != pytest.approx(m["avalanche_forgetting"])
    assert m["final_acc_per_task"] == pytest.approx(R[-1])


def test_single_task_leaves_transfer_and_forgetting_undefined():
    m = summarize([[0.8]], [0.1])
    assert m["acc"] == pytest.approx(0.8) and m["avg_incremental_acc"] == pytest.approx(0.8)
    assert m["bwt"] is None and m["fwt"] is None
    assert m["forgetting"] is None and m["avalanche_forgetting"] is None
    assert m["forgetting_per_task"] == [] and m["avalanche_forgetting_per_task"] == []


def test_first_task_prefix_of_a_run():
    # After the first task of a longer run, the metrics of the seen prefix are those of T=1.
    first = np.asarray(R)[:1, :1]
    assert average_accuracy(first) == pytest.approx(0.90)
    assert average_incremental_accuracy(first) == pytest.approx(0.90)
    assert backward_transfer(first) is None and max_forgetting(first) is None


def test_gem_convention_differs_from_gem_code_by_t_minus_one_over_t():
    """GEM's paper divides by T-1 (our convention); its released code averages over T with zero
    terms for the last task's BWT and the first task's FWT. Re-implemented here as the reference."""
    Rm, b = np.asarray(R), np.asarray(B)
    T = Rm.shape[0]
    code_bwt = np.mean(Rm[-1] - np.diag(Rm))  # includes the last task's 0
    code_fwt = np.mean([0.0] + [Rm[t - 1, t] - b[t] for t in range(1, T)])
    assert backward_transfer(Rm) * (T - 1) / T == pytest.approx(code_bwt)
    assert forward_transfer(Rm, b) * (T - 1) / T == pytest.approx(code_fwt)


def test_fwt_undefined_for_class_incremental_and_without_baseline():
    assert summarize(R, B, fwt_defined=False)["fwt"] is None
    assert forward_transfer(R, None) is None


def test_forgetting_is_negative_when_a_task_improves():
    up = [[0.5, 0.0], [0.9, 0.7]]
    # Chaudhry's max runs over l < T only, so a task that keeps improving has negative forgetting.
    assert forgetting_per_task(up) == [pytest.approx(-0.4)]
    assert avalanche_forgetting(up) == pytest.approx(-0.4)
    assert backward_transfer(up) == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[[0.1]]]])
def test_rejects_non_square(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_baseline_length_checked():
    with pytest.raises(ValueError, match="one entry per task"):
        forward_transfer(R, [0.1, 0.2])
