"""Compare strategies over seeds: ``mmtune continual sweep RECIPE --strategies a,b+c --seeds N``,
``benchmarks/continual_digits.py`` and the slow statistical tests.

:func:`compare` runs one recipe (a shipped name, a path, or a dict) once per strategy and seed,
with the per-run report files off, and returns per-run metrics; :func:`table` formats means and
standard deviations (population std over seeds) as a Markdown table; :func:`mmtune.continual.sweep_report.run_sweep` does both
and writes one report (:mod:`mmtune.continual.sweep_report`). A strategy is a name or a
composition ``replay+lwf``; each takes its settings from the recipe's
``continual.strategy.settings`` table.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import load_yaml, resolve_recipe_path, validate_recipe
from .config import StrategyConfig
from .runner import run_continual

COLUMNS = (("acc", "ACC"), ("avg_incremental_acc", "avg inc. ACC"), ("bwt", "BWT"), ("fwt", "FWT"),
           ("forgetting", "forgetting (max)"), ("avalanche_forgetting", "forgetting (Avalanche)"))


def split_digits_tasks(scenario: str, n_tasks: int = 5) -> list[dict]:
    """The standard Split-Digits tasks: digit pairs (class / task scenarios) or permutations (domain)."""
    if scenario == "domain":
        return [{"name": f"perm{i}", "source": f"digits-permuted:{i}"} for i in range(n_tasks)]
    return [{"name": f"{2 * i}-{2 * i + 1}", "source": f"digits:{2 * i},{2 * i + 1}"} for i in range(n_tasks)]


def recipe_data(recipe: str | Path | dict) -> dict:
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe)
    return load_yaml(resolve_recipe_path(str(recipe)))


def compare(recipe: str | Path | dict, strategies: Sequence[str], seeds: Sequence[int], *,
            scenario: str | None = None, edit: Callable[[dict, str], None] | None = None,
            out_dir: str | Path | None = None, log=print) -> dict[str, list[dict]]:
    """Run ``recipe`` for every strategy and seed. ``scenario`` switches the digits scenario (and
    its tasks); ``edit(data, strategy)`` may change the recipe dict per strategy (e.g. the net for
    l2p). Returns ``{strategy: [metrics of each seed]}`` (each with ``R`` and ``b`` added)."""
    base = recipe_data(recipe)
    strategy = base.setdefault("continual", {}).get("strategy")
    if isinstance(strategy, list):  # the list form: its settings go to the table of the mapping form
        base["continual"]["strategy"] = StrategyConfig.from_list(strategy)
    base["continual"].setdefault("strategy", {})
    if scenario is not None:
        base["continual"]["scenario"] = scenario
        if base["continual"].get("benchmark", "digits") == "digits":
            base["continual"]["tasks"] = split_digits_tasks(scenario, len(base["continual"]["tasks"]))
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmtune-sweep-")
        out_dir = tmp.name
    results: dict[str, list[dict]] = {}
    try:
        for name in strategies:
            for seed in seeds:
                data = copy.deepcopy(base)
                data["continual"]["strategy"]["name"] = name
                data["continual"]["report"] = False
                data.setdefault("train", {}).update(seed=seed, progress=False, tensorboard=False,
                                                    output_dir=str(Path(out_dir) / f"{name}-seed{seed}"))
                if edit is not None:
                    edit(data, name)
                t0 = time.perf_counter()
                res = run_continual(validate_recipe(data, f"<{name} seed {seed}>"), log=lambda s: None)
                row = {**res["metrics"], "R": res["R"], "b": res["b"], "seed": seed, "terms": res["terms"],
                       "seconds": time.perf_counter() - t0, "tasks": res["tasks"]}
                results.setdefault(name, []).append(row)
                log(f"{name} seed {seed}: ACC {row['acc']:.3f} forgetting {row['forgetting']:.3f}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def mean_std(rows: list[dict], key: str) -> tuple[float, float] | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def table(results: dict[str, list[dict]], title: str = "") -> str:
    """Markdown: one row per strategy, mean +- std over seeds per metric (x100, i.e. points)."""
    head = "| strategy | seeds | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|---|---|" + "---|" * len(COLUMNS)]
    for name, rows in results.items():
        cells = []
        for key, _ in COLUMNS:
            ms = mean_std(rows, key)
            cells.append("n/a" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagonal(row: dict) -> float:
    """Mean R[j][j]: how well each task was learned when it was trained (plasticity)."""
    R = row["R"]
    return statistics.fmean(R[j][j] for j in range(len(R)))


def paired_difference(results: dict[str, list[dict]], name: str, baseline: str, key: str = "acc") -> dict | None:
    """``name`` minus ``baseline`` on ``key``, paired by seed: mean, sample sd and t = mean / (sd / sqrt n)."""
    base = {r["seed"]: r[key] for r in results.get(baseline, []) if r.get(key) is not None}
    diffs = [r[key] - base[r["seed"]] for r in results.get(name, []) if r.get(key) is not None and r["seed"] in base]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    return {"n": len(diffs), "mean": mean, "sd": sd, "t": mean / (sd / len(diffs) ** 0.5) if sd > 0 else None}


def parse_strategies(text: str) -> list[str]:
    """``a,b+c`` -> [a, b+c] (a composition keeps its ``+``)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        from ..errors import ConfigError

        raise ConfigError("--strategies: give at least one strategy, e.g. --strategies naive,replay,replay+lwf")
    return names
