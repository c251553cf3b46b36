"""The continual-learning report: Markdown, a heatmap of R, per-task curves, metrics JSON.

Files written into the run's output directory:

- ``report.md``: the accuracy matrix (baseline row b, then one row per trained task), the
  metrics (:mod:`mmtune.continual.metrics`), per-task forgetting, and the two figures;
- ``accuracy_matrix.png``: heatmap of [b; R] (matplotlib, Agg backend: no display needed);
- ``task_curves.png``: each task's accuracy along the sequence (after every task, or every
  ``curve_every`` steps), and the training loss with the task boundaries;
- ``metrics.json``: everything above as numbers (``null`` where a metric is undefined).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRIC_ROWS = (
    ("acc", "Average accuracy (ACC)", "mean_j R[T][j]"),
    ("avg_incremental_acc", "Average incremental accuracy", "mean_t mean_{j<=t} R[t][j]"),
    ("bwt", "Backward transfer (BWT)", "1/(T-1) sum_{j<T} R[T][j] - R[j][j]"),
    ("fwt", "Forward transfer (FWT)", "1/(T-1) sum_{j>=2} R[j-1][j] - b_j"),
    ("forgetting", "Forgetting, max-based (Chaudhry 2018)", "mean_{j<T} max_{j<=l<T} R[l][j] - R[T][j]"),
    ("avalanche_forgetting", "Forgetting, Avalanche (drop since learned)", "mean_{j<T} R[j][j] - R[T][j]"),
    ("plasticity", "Plasticity (accuracy when learned)", "mean_j R[j][j]"),
    ("intransigence", "Intransigence (Chaudhry 2018)", "mean_j a*_j - R[j][j], a* = reference (joint) run"),
)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(R: list[list[float]], b: list[float], tasks: list[str], path: Path) -> Path:
    plt = _plt()
    M = np.array([b] + list(R), dtype=float)  # (T+1, T)
    rows = ["before"] + [f"after {i + 1}: {n}" for i, n in enumerate(tasks[: len(R)])]
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 3, 0.55 * len(rows) + 1.5))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("evaluated task")
    ax.set_title("Accuracy matrix R (rows: after training task i)")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", color="w" if M[i, j] < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(result: dict, path: Path) -> Path:
    plt = _plt()
    tasks, R, b = result["tasks"], result["R"], result["b"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    losses = result.get("losses", [])
    bounds = np.cumsum([len(x) for x in losses]).tolist()
    if result.get("curves"):
        # Fine curves: x = global step; points at the task boundaries come from R.
        offsets = [0] + bounds
        for j, name in enumerate(tasks):
            xs, ys = [0], [b[j]]
            for c in result["curves"]:
                xs.append(offsets[c["task"]] + c["step"])
                ys.append(c["acc"][j])
            pts = sorted(zip(xs + bounds[: len(R)], ys + [r[j] for r in R]))
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        for x in bounds[:-1]:
            ax1.axvline(x, color="grey", lw=0.6, ls="--")
        ax1.set_xlabel("optimizer step (all tasks)")
    else:
        xs = list(range(len(R) + 1))
        for j, name in enumerate(tasks):
            ax1.plot(xs, [b[j]] + [r[j] for r in R], marker="o", label=name)
        ax1.set_xticks(xs, labels=["before"] + [str(i + 1) for i in range(len(R))])
        ax1.set_xlabel("tasks trained")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel("accuracy")
    ax1.set_title("Per-task accuracy along the sequence")
    ax1.legend(fontsize=8)
    flat = [v for x in losses for v in x]
    ax2.plot(range(1, len(flat) + 1), flat, lw=0.8)
    for x in bounds[:-1]:
        ax2.axvline(x, color="grey", lw=0.6, ls="--")
    ax2.set_xlabel("optimizer step (all tasks)")
    ax2.set_ylabel("training loss (task objective)")
    ax2.set_title("Training loss; dashed: task boundaries")
    if flat and min(flat) > 0:
        ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict) -> str:
    tasks, R, b, m = result["tasks"], result["R"], result["b"], result["metrics"]
    lines = [f"# Continual learning report: {result['strategy']} on {result['benchmark']} "
             f"({result['scenario']}-incremental, {len(tasks)} tasks)", ""]
    unlearned = m.get("unlearned_tasks") or []
    if unlearned:
        names = ", ".join(f"{tasks[j]} ({R[j][j]:.3f})" for j in unlearned)
        lines += [f"> **Never learned**: R[j][j] < {m['learned_threshold']:g} for {names}. A task that was never "
                  "learned cannot be forgotten, so this run's forgetting is not meaningful; read the plasticity.", ""]
    overlap = result.get("eval_overlap") or []
    seen = [f"{tasks[j]} ({x:.0%})" for j, x in enumerate(overlap) if x > 0]
    if seen:
        lines += [f"> **Scored on training items**: {', '.join(seen)} of the evaluation items are also training "
                  "items, so those columns measure memorisation, not generalisation; give held-out "
                  "`eval_source`s.", ""]
    lines += ["## Accuracy matrix", "",
              "Row *after i*: metric on every task after training tasks 1..i; *before*: the untrained model (b).", "",
              "| | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines.append("| before | " + " | ".join(f"{x:.3f}" for x in b) + " |")
    for i, row in enumerate(R):
        cells = [f"**{x:.3f}**" if j == i else f"{x:.3f}" for j, x in enumerate(row)]
        lines.append(f"| after {i + 1} | " + " | ".join(cells) + " |")
    Rs, ms = result.get("R_seen") or [], result.get("metrics_seen")
    if Rs and ms:
        lines += ["", "## Training items (memorisation)", "",
                  "The same, scored on training items of each task (`seen_eval_size`): what was memorised. "
                  "The matrix above is on held-out items.", "",
                  "| | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        lines.append("| before | " + " | ".join(f"{x:.3f}" for x in result["b_seen"]) + " |")
        for i, row in enumerate(Rs):
            cells = [f"**{x:.3f}**" if j == i else f"{x:.3f}" for j, x in enumerate(row)]
            lines.append(f"| after {i + 1} | " + " | ".join(cells) + " |")
        lines += ["", f"ACC {_fmt(ms['acc'])}, forgetting (max-based) {_fmt(ms['forgetting'])}, plasticity "
                  f"{_fmt(ms['plasticity'])} on training items."]
    probes, P = result.get("probes") or [], result.get("P") or []
    if probes and P:
        lines += ["", "## Probes (evaluated, never trained)", "",
                  "General ability before training and after each task; `loss` in nats per token (lower is "
                  "better), the others in [0, 1].", "",
                  "| | " + " | ".join(probes) + " |", "|---|" + "---|" * len(probes)]
        for i, row in enumerate(P):
            lines.append(f"| {'before' if i == 0 else f'after {i}'} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
        change = []
        for k, name in enumerate(probes):
            first, last = P[0][k], P[-1][k]
            rel = f" ({(last - first) / first:+.1%})" if "(loss)" in name and first else ""
            change.append(f"{last - first:+.3f}{rel}")
        lines.append("| change | " + " | ".join(change) + " |")
    lines += ["", "## Metrics", "", "| metric | value | definition |", "|---|---|---|"]
    for key, label, definition in METRIC_ROWS:
        lines.append(f"| {label} | {_fmt(m[key])} | `{definition}` |")
    if len(tasks) > 1:
        lines += ["", "| task | when learned R[j][j] | final | max-based forgetting | Avalanche forgetting |",
                  "|---|---|---|---|---|"]
        for j, name in enumerate(tasks):
            f = m["forgetting_per_task"][j] if j < len(tasks) - 1 else None
            a = m["avalanche_forgetting_per_task"][j] if j < len(tasks) - 1 else None
            flag = " (never learned)" if j in unlearned else ""
            lines.append(f"| {name} | {R[j][j]:.3f}{flag} | {R[-1][j]:.3f} | {_fmt(f)} | {_fmt(a)} |")
    notes = []
    if m["fwt"] is None and len(tasks) > 1:
        notes.append("FWT is n/a in the class-incremental scenario: a single head never trained on a task's "
                     "classes cannot predict them, so R[j-1][j] is 0 by construction and says nothing about transfer.")
    if len(tasks) == 1:
        notes.append("BWT, FWT and forgetting are n/a with a single task.")
    if m.get("intransigence") is None:
        notes.append("Intransigence is n/a without a reference: set continual.intransigence_reference to the "
                     "metrics.json of a `joint` run of the same tasks.")
    state = result.get("strategy_state") or {}
    if state.get("events"):
        notes.append(f"EWC guard scaled lambda {len(state['events'])} time(s); final scale {state['scale']:.3g}.")
    if state.get("buffer", {}).get("bytes"):
        buf, nb = state["buffer"], state["buffer"]["bytes"]
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in nb["fields"].items())
        notes.append(f"Memory: {buf['size']} examples of {buf['seen']} seen, {nb['total']:,} bytes in all, "
                     f"{nb['per_example']:,.0f} bytes per example ({parts}; tensors at their dtype, token ids "
                     "as int64).")
    if "projections" in state:
        notes.append(f"A-GEM projected {state['projections']} of {state['steps']} steps.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Figures", "", "![accuracy matrix](accuracy_matrix.png)", "", "![per-task curves](task_curves.png)", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, result: dict) -> dict[str, str]:
    """Write the four report files; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "heatmap": out / "accuracy_matrix.png",
             "curves": out / "task_curves.png", "json": out / "metrics.json"}
    plot_matrix(result["R"], result["b"], result["tasks"], paths["heatmap"])
    plot_curves(result, paths["curves"])
    paths["markdown"].write_text(markdown(result), encoding="utf-8")
    keys = ("tasks", "strategy", "benchmark", "scenario", "b", "R", "metrics", "steps", "metric_names",
            "strategy_state", "curves", "eval_overlap", "probes", "P", "R_seen", "b_seen", "metrics_seen")
    paths["json"].write_text(json.dumps({k: result.get(k) for k in keys}, indent=1, default=str), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}
