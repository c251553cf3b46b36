"""The report of ``mmtune continual sweep``: one table over strategies and seeds, and figures.

Files written into the sweep's output directory:

- ``sweep.md``: mean ± sd over seeds (population sd, in points) of ACC, average incremental
  accuracy, BWT, FWT, both forgettings and the mean diagonal R[j][j] per strategy; each
  strategy's ACC against the first one's, paired by seed; the mean loss terms per strategy (each
  term under its own name); per-seed ACC; run times;
- ``accuracy_matrices.png``: one heatmap per strategy of the seed-mean [b; R];
- ``task_curves.png``: one panel per strategy, each task's accuracy along the sequence (mean over
  seeds, band: ± sd);
- ``sweep.json``: every run's metrics, R, b and mean loss terms.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..config import apply_overrides, validate_recipe
from .config import StrategyConfig
from .report import _plt
from .sweep import compare, diagonal, mean_std, paired_difference, recipe_data, table


def _mean_matrix(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Seed mean and sd of [b; R], (T+1, T) each."""
    M = np.array([[r["b"]] + r["R"] for r in rows], dtype=float)  # (S, T+1, T)
    return M.mean(axis=0), M.std(axis=0)


def _grid(results: dict[str, list[dict]], panel_size, **kw):
    """One panel per strategy, at most three a row; unused panels hidden. ``panel_size(T)`` gives a
    panel's (width, height) in inches for T tasks."""
    plt = _plt()
    names = list(results)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    tasks = results[names[0]][0]["tasks"]
    w, h = panel_size(len(tasks))
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * w, nrows * h), squeeze=False, **kw)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    return plt, fig, axes, names, tasks, len(tasks)


def plot_matrices(results: dict[str, list[dict]], path: Path) -> Path:
    plt, fig, axes, names, tasks, T = _grid(results, lambda T: (0.9 * T + 2.4, 0.5 * T + 2.0), layout="constrained")
    for ax, name in zip(axes.flat, names):
        M, _ = _mean_matrix(results[name])
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(T), labels=tasks, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(T + 1), labels=["before"] + [f"after {i + 1}" for i in range(T)], fontsize=7)
        ax.set_title(f"{name} (ACC {100 * M[-1].mean():.1f}, {len(results[name])} seeds)", fontsize=9)
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if M[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    fig.suptitle("Seed-mean accuracy matrix [b; R] (rows: after training task i)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(results: dict[str, list[dict]], path: Path) -> Path:
    plt, fig, axes, names, tasks, T = _grid(results, lambda T: (4.2, 3.2), sharey=True)
    xs = np.arange(T + 1)
    for ax, name in zip(axes.flat, names):
        mean, sd = _mean_matrix(results[name])
        for j, task in enumerate(tasks):
            line, = ax.plot(xs, mean[:, j], marker="o", ms=3, label=task)
            ax.fill_between(xs, mean[:, j] - sd[:, j], mean[:, j] + sd[:, j], color=line.get_color(), alpha=0.15)
        ax.set_xticks(xs, labels=["b"] + [str(i + 1) for i in range(T)])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("tasks trained")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Per-task accuracy along the sequence (mean over seeds, band ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pm(ms) -> str:
    return "n/a" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def markdown(results: dict[str, list[dict]], meta: dict) -> str:
    names = list(results)
    lines = [f"# Continual sweep: {meta['title']}", "",
             f"Recipe `{meta['recipe']}`" + (f" with `{' '.join(meta['overrides'])}`" if meta["overrides"] else "")
             + f", {meta['benchmark']} benchmark, {meta['scenario']}-incremental, seeds {meta['seeds']}; "
             f"{meta['seconds']:.0f} s in all.", "",
             "## Results", "", "Mean ± sd over seeds (population sd), in points (x100).", "",
             table(results), ""]
    lines += ["| strategy | mean R[j][j] (learned when trained) | s per run |", "|---|---|---|"]
    for name, rows in results.items():
        diag = mean_std([{"d": diagonal(r)} for r in rows], "d")
        secs = statistics.fmean(r.get("seconds", 0.0) for r in rows)
        lines.append(f"| {name} | {_pm(diag)} | {secs:.1f} |")
    if len(names) > 1:
        base = names[0]
        lines += ["", f"## ACC against {base}, paired by seed", "",
                  f"Difference of ACC from `{base}` run with the same seed: mean ± sample sd, t = mean / (sd / "
                  "sqrt n); |t| > 2.78 is p < 0.05 (two-sided) at n = 5.", "",
                  "| strategy | ΔACC | t | n |", "|---|---|---|---|"]
        for name in names[1:]:
            d = paired_difference(results, name, base)
            if d is None:
                lines.append(f"| {name} | n/a | n/a | - |")
                continue
            t = "n/a" if d["t"] is None else f"{d['t']:+.2f}"
            lines.append(f"| {name} | {100 * d['mean']:+.1f} ± {100 * d['sd']:.1f} | {t} | {d['n']} |")
    terms = sorted({k for rows in results.values() for r in rows for task in r.get("terms", []) for k in task})
    if terms:
        lines += ["", "## Loss terms", "",
                  "Mean over tasks, steps and seeds of the task loss and of each strategy's term (each logged under its "
                  "own name; a blank: the strategy has no such term).", "",
                  "| strategy | " + " | ".join(terms) + " |", "|---|" + "---|" * len(terms)]
        for name, rows in results.items():
            cells = []
            for k in terms:
                vals = [task[k] for r in rows for task in r.get("terms", []) if k in task]
                cells.append(f"{statistics.fmean(vals):.4f}" if vals else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## ACC per seed", "", "| strategy | " + " | ".join(f"seed {s}" for s in meta["seeds"]) + " |",
              "|---|" + "---|" * len(meta["seeds"])]
    for name, rows in results.items():
        by_seed = {r["seed"]: r["acc"] for r in rows}
        lines.append(f"| {name} | " + " | ".join(f"{100 * by_seed[s]:.1f}" if s in by_seed else "" for s in meta["seeds"])
                     + " |")
    lines += ["", "## Figures", "", "![accuracy matrices](accuracy_matrices.png)", "",
              "![per-task curves](task_curves.png)", ""]
    return "\n".join(lines)


def write_sweep_report(out_dir: str | Path, results: dict[str, list[dict]], meta: dict) -> dict[str, str]:
    """Write the four files of the sweep report into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "sweep.md", "heatmaps": out / "accuracy_matrices.png",
             "curves": out / "task_curves.png", "json": out / "sweep.json"}
    plot_matrices(results, paths["heatmaps"])
    plot_curves(results, paths["curves"])
    paths["markdown"].write_text(markdown(results, meta), encoding="utf-8")
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def run_sweep(recipe: str | Path | dict, strategies: Sequence[str], seeds: Sequence[int], out_dir: str | Path, *,
              overrides: Sequence[str] = (), scenario: str | None = None,
              edit: Callable[[dict, str], None] | None = None, title: str | None = None, log=print) -> dict:
    """Run every strategy for every seed and write the sweep report into ``out_dir`` (runs in
    ``out_dir/runs``). Returns the per-run results and the report's paths."""
    data = apply_overrides(recipe_data(recipe), list(overrides))
    validate_recipe(copy.deepcopy(data), str(recipe))  # a bad key fails before the first run
    for name in strategies:  # and so does an unknown strategy or a bad composition
        probe = copy.deepcopy(data)
        strat = probe["continual"].get("strategy")
        probe["continual"]["strategy"] = {**(StrategyConfig.from_list(strat) if isinstance(strat, list)
                                             else strat or {}), "name": name}
        validate_recipe(probe, f"--strategies {name}")
    out = Path(out_dir)
    t0 = time.perf_counter()
    results = compare(data, strategies, seeds, scenario=scenario, edit=edit, out_dir=out / "runs", log=log)
    seconds = time.perf_counter() - t0
    cc = validate_recipe(copy.deepcopy(data), str(recipe)).continual
    meta = {"recipe": str(recipe) if not isinstance(recipe, dict) else "<dict>", "overrides": list(overrides),
            "scenario": scenario or cc.scenario, "benchmark": cc.benchmark, "seeds": list(seeds),
            "strategies": list(strategies), "seconds": seconds,
            "title": title or f"{recipe if not isinstance(recipe, dict) else 'recipe'}: "
                              f"{scenario or cc.scenario}-incremental, {len(list(seeds))} seed{'s' * (len(list(seeds)) != 1)}"}
    paths = write_sweep_report(out, results, meta)
    return {"results": results, "report": paths, "meta": meta}
