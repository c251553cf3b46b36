"""Continual-learning metrics from the accuracy matrix.

Notation (docs/reference/continual.md#accuracy-matrix-and-metrics; Lopez-Paz & Ranzato 2017 "GEM" section 3; Chaudhry et al.
2018 "Riemannian Walk" section 4): with T tasks, ``R[i][j]`` is the accuracy on task j after
training tasks 1..i, and ``b[j]`` the accuracy on task j before any training. Here ``R`` is a
0-based (T, T) array: ``R[i, j]`` is measured after the (i+1)-th task.

- ``acc``: average accuracy, mean_j R[T][j].
- ``avg_incremental_acc``: mean over t of mean_{j<=t} R[t][j] (Rebuffi et al. 2017, iCaRL).
- ``bwt``: backward transfer, 1/(T-1) sum_{j<T} (R[T][j] - R[j][j]) (GEM).
- ``fwt``: forward transfer, 1/(T-1) sum_{j>=2} (R[j-1][j] - b_j) (GEM).

  BWT and FWT follow the GEM paper's 1/(T-1). GEM's released code
  (``metrics/metrics.py::confusion_matrix``) averages the same terms over all T tasks, the
  last task's BWT term and the first task's FWT term being 0, so its numbers are the paper's
  times (T-1)/T; compare with care.
- ``forgetting``: max-based forgetting (Chaudhry 2018): f_j = max_{l in [j, T-1]} R[l][j] - R[T][j],
  averaged over j < T.
- ``avalanche_forgetting``: Avalanche's ``StreamForgetting``: R[j][j] - R[T][j] averaged over
  j < T (Avalanche ``evaluation/metrics/forgetting_bwt.py`` reports no value for the experience
  just trained), i.e. the drop since the task was learned (= -BWT). A different quantity from
  ``forgetting`` whenever a task's accuracy rose after it was learned; the two keep distinct
  names so results are not compared across conventions by mistake.

Forgetting is only meaningful for tasks that were learned: a task never learned cannot be
forgotten, so a strategy that learns nothing scores a low forgetting (issue 17: L2P and O-LoRA on
class-incremental digits). Read it beside

- ``plasticity``: mean_j R[j][j], the accuracy on each task right after learning it ("learning
  accuracy", Riemer et al. 2019 "MER" sec. 5; the a_{k,k} of Chaudhry et al. 2018 sec. 4);
- ``intransigence``: mean_j (a*_j - R[j][j]) (Chaudhry et al. 2018, "Riemannian Walk", eq. 10):
  the gap to a reference a* that learned task j with all data up to j (a ``joint`` run's
  diagonal); ``None`` without a reference;
- ``unlearned_tasks``: the tasks with R[j][j] below ``learned_threshold`` (default 0.5); when any
  is listed the report flags the run ("never learned": its forgetting is not meaningful).

Undefined values are ``None`` (JSON ``null``, "n/a" in reports):

- with one task, BWT, FWT and both forgettings (averages over zero tasks);
- FWT in the class-incremental scenario: a single head never trained on task j's classes
  cannot predict them, so R[j-1][j] is 0 by construction and ``R[j-1][j] - b_j`` measures the
  untrained model's chance level, not transfer. Pass ``fwt_defined=False`` there.
- FWT when ``b`` is not given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square (T, T) matrix, got shape {R.shape}")
    return R


def average_accuracy(R) -> float:
    R = _matrix(R)
    return float(R[-1].mean())


def average_incremental_accuracy(R) -> float:
    R = _matrix(R)
    return float(np.mean([R[t, : t + 1].mean() for t in range(R.shape[0])]))


def backward_transfer(R) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R, b: Sequence[float] | None) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    if T < 2 or b is None:
        return None
    b = np.asarray(b, dtype=float)
    if b.shape != (T,):
        raise ValueError(f"b must have one entry per task ({T}), got shape {b.shape}")
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting_per_task(R) -> list[float]:
    """Chaudhry 2018: f_j = max_{l in [j, T-1]} R[l][j] - R[T][j] for j < T (0-based rows j..T-2)."""
    R = _matrix(R)
    T = R.shape[0]
    return [float(R[j:T - 1, j].max() - R[-1, j]) for j in range(T - 1)]


def max_forgetting(R) -> float | None:
    f = forgetting_per_task(R)
    return float(np.mean(f)) if f else None


def avalanche_forgetting_per_task(R) -> list[float]:
    """Avalanche: accuracy right after learning task j minus the final accuracy, j < T."""
    R = _matrix(R)
    T = R.shape[0]
    return [float(R[j, j] - R[-1, j]) for j in range(T - 1)]


def avalanche_forgetting(R) -> float | None:
    f = avalanche_forgetting_per_task(R)
    return float(np.mean(f)) if f else None


def plasticity(R) -> float:
    """mean_j R[j][j]: how well each task was learned when it was trained."""
    R = _matrix(R)
    return float(np.mean(np.diag(R)))


def intransigence(R, reference: Sequence[float] | None) -> float | None:
    """Chaudhry 2018 eq. 10: mean_j (reference_j - R[j][j]); None without a reference."""
    R = _matrix(R)
    if reference is None:
        return None
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (R.shape[0],):
        raise ValueError(f"the intransigence reference must have one accuracy per task ({R.shape[0]}), "
                         f"got shape {ref.shape}")
    return float(np.mean(ref - np.diag(R)))


def unlearned_tasks(R, threshold: float = 0.5) -> list[int]:
    """0-based indices j with R[j][j] < ``threshold``: tasks the run never learned."""
    return [j for j, x in enumerate(np.diag(_matrix(R))) if x < threshold]


def summarize(R, b: Sequence[float] | None = None, *, fwt_defined: bool = True,
              reference: Sequence[float] | None = None, learned_threshold: float = 0.5) -> dict:
    """Every metric of this module for accuracy matrix ``R`` (T, T), baseline ``b`` (T,) and the
    intransigence ``reference`` (T,), e.g. a joint run's diagonal."""
    R = _matrix(R)
    return {
        "plasticity": plasticity(R),
        "intransigence": intransigence(R, reference),
        "diagonal": [float(x) for x in np.diag(R)],
        "unlearned_tasks": unlearned_tasks(R, learned_threshold),
        "learned_threshold": float(learned_threshold),
        "acc": average_accuracy(R),
        "avg_incremental_acc": average_incremental_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b) if fwt_defined else None,
        "forgetting": max_forgetting(R),
        "avalanche_forgetting": avalanche_forgetting(R),
        "forgetting_per_task": forgetting_per_task(R),
        "avalanche_forgetting_per_task": avalanche_forgetting_per_task(R),
        "final_acc_per_task": [float(x) for x in R[-1]],
    }


def load_reference(spec: Sequence[float] | str | None, n_tasks: int, where: str = "continual.intransigence_reference"
                   ) -> list[float] | None:
    """The intransigence reference: a list of per-task accuracies, or the ``metrics.json`` of a run
    of the same tasks (typically ``joint``), whose diagonal R[j][j] is taken."""

    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{where} = {spec!r}: no such file; give the metrics.json of a joint run "
                              "or a list of per-task accuracies")
        data = json.loads(path.read_text())
        R = data.get("R")
        if not R:
            raise ConfigError(f"{where} = {spec!r}: the file has no accuracy matrix R (a continual metrics.json?)")
        values = [float(R[j][j]) for j in range(len(R))]
    else:
        values = [float(x) for x in spec]
    if len(values) != n_tasks:
        raise ConfigError(f"{where}: {len(values)} accuracies for {n_tasks} tasks; give one per task")
    return values
