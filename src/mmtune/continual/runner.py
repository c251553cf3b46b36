"""`mmtune continual RECIPE`: train a task sequence with a strategy, measure forgetting, report.

For T tasks the runner evaluates every task (seen and unseen) before any training (the baseline
b) and after each task (row t of the accuracy matrix R), trains each task with the one training
loop (:class:`~mmtune.train.loop.Trainer`, the strategy as its plugin), and writes the report
(:mod:`mmtune.continual.report`) once the sequence is done.

Output directory layout (``train.output_dir``)::

    tasks/01-NAME/           the Trainer's own output for each task (metrics.jsonl, checkpoint)
    continual/state/         resume point, written atomically after each finished task:
                               weights.safetensors (every parameter trained so far),
                               strategy.pt (memories, Fisher, RNG states), progress.json
                               (b, R rows, the probe rows P, the training-item
                               rows R_seen, losses, loss terms, curves), optimizer.pt
                               (keep_optimizer_state)
    continual/buffer/        on-disk rehearsal memory (``on_disk: true``)
    report.md, accuracy_matrix.png, task_curves.png, metrics.json

``resume=True`` continues after the last finished task: the model is rebuilt from the same seed,
the strategy's state restored, then the saved weights loaded. A run interrupted inside a task
redoes that task, from the same state, with the same seeds, so it ends with the same R.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, MMTuneError
from ..train.loop import Trainer, seed_everything
from .benchmarks import Benchmark, DigitsBenchmark, TaskData, TextBenchmark
from .config import ContinualConfig
from .metrics import load_reference, summarize
from .multimodal import MultimodalBenchmark
from .optimizer_state import load_param_states, param_states
from .strategies import STRATEGIES
from .strategies.base import Strategy, StrategyContext, isolated_rng
from .strategies.compose import Composite

#: Recipe keys that may change between a run and its resume (they do not change results).
_VOLATILE_TRAIN_KEYS = ("output_dir", "progress", "tensorboard", "log_every")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("continual.device = cuda, but no CUDA device is available")
    return torch.device(name)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "task"


def _fingerprint(recipe) -> dict:
    data = recipe.model_dump(mode="json")
    for k in _VOLATILE_TRAIN_KEYS:
        data["train"].pop(k, None)
    return data


def evaluate_all(bench: Benchmark, strategy: Strategy, model, batch_size: int, seen: bool = False) -> list[float]:
    """Every task's metric for ``model`` now, each task evaluated through the strategy's routing.
    ``seen``: on the training items of tasks that give ``seen_eval_size`` (others: skipped, [])."""
    if seen and not all(t.seen for t in bench.tasks):
        return []
    accs = []
    with isolated_rng(0):
        for task in bench.tasks:
            with strategy.route(model, task.info):
                target = replace(task, eval=task.seen) if seen else task
                accs.append(float(bench.evaluate(model, target, batch_size)))
    return accs


class CurvePlugin:
    """Trainer plugin: every ``every`` steps, evaluate all tasks (the finer per-task curves)."""

    def __init__(self, fn, every: int, task_index: int, sink: list):
        self.fn, self.every, self.task_index, self.sink = fn, every, task_index, sink

    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            self.sink.append({"task": self.task_index, "step": step, "acc": self.fn()})


# ---------------------------------------------------------------------------------------------
# State


def _state_dirs(cdir: Path) -> list[Path]:
    """The saved state, or (after a crash between the two renames of a save) the previous one."""
    cands = [cdir / "state"] + sorted(cdir.glob(".old-state-*"))
    return [p for p in cands if (p / "progress.json").is_file()]


def save_state(cdir: Path, model, trained: set[str], strategy: Strategy, progress: dict, fingerprint: dict,
               optimizer: dict | None = None) -> None:
    """Write the resume point into ``cdir/state`` atomically (temp dir, then rename)."""
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cdir / f".tmp-state-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {n: v.detach().cpu().clone().contiguous() for n, v in model.state_dict().items() if n in trained}
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save(strategy.state_dict(), tmp / "strategy.pt")
    if optimizer:  # continual.keep_optimizer_state: the state carried into the next task
        torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "recipe.json").write_text(json.dumps(fingerprint, sort_keys=True))
    (tmp / "progress.json").write_text(json.dumps(progress))  # written last: marks the state complete
    dest = cdir / "state"
    if dest.exists():
        old = cdir / f".old-state-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def load_state(cdir: Path) -> dict | None:
    dirs = _state_dirs(cdir)
    if not dirs:
        return None
    d = dirs[0]
    return {
        "dir": d,
        "progress": json.loads((d / "progress.json").read_text()),
        "fingerprint": json.loads((d / "recipe.json").read_text()),
        "strategy": torch.load(d / "strategy.pt", map_location="cpu", weights_only=False),
        "optimizer": torch.load(d / "optimizer.pt", map_location="cpu") if (d / "optimizer.pt").is_file() else {},
    }


def _load_weights(model, path: Path) -> None:
    weights = load_file(str(path))
    own = model.state_dict()
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise MMTuneError(f"saved continual state {path} does not match the model (unknown {unknown[:3]}); "
                          "start over without --resume")
    model.load_state_dict(weights, strict=False)


def _diff_keys(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------
# The run


def build_benchmark(recipe) -> Benchmark:
    cc: ContinualConfig = recipe.continual
    if cc.benchmark == "digits":
        return DigitsBenchmark(cc)
    if cc.benchmark == "text":
        return TextBenchmark(recipe, cc)
    if cc.benchmark == "multimodal":
        return MultimodalBenchmark(recipe, cc)
    raise ConfigError(f"continual.benchmark = {cc.benchmark!r}; valid: digits, text, multimodal")


def build_strategy(recipe, bench: Benchmark, device: torch.device, work_dir: Path, log=print) -> Strategy:
    cc = recipe.continual
    classes = [STRATEGIES.get(name) for name in cc.strategy.names]
    for cls in classes:
        if cls.needs_task_id and cc.scenario != "task":
            raise ConfigError(f"continual.strategy.name = {cls.name} routes by task id at test: it needs "
                              f"continual.scenario: task (got {cc.scenario})")
    objective = bench.objective(features=False)
    has_reference = type(bench).reference_rows is not Benchmark.reference_rows
    ctx = StrategyContext(objective=objective, collate=bench.collate, device=device, scenario=cc.scenario,
                          tasks=[t.info for t in bench.tasks], seed=recipe.train.seed,
                          batch_size=recipe.train.batch_size, lr=recipe.train.lr, work_dir=work_dir, label_fn=bench.label,
                          kd_groups=bench.kd_groups, reference_rows=bench.reference_rows if has_reference else None,
                          lora_defaults=bench.lora_defaults, log=log)
    members = [cls(cls.parse_settings(cc.strategy.settings_for(cls.name)), ctx) for cls in classes]
    strategy = members[0] if len(members) == 1 else Composite(members, ctx)
    if strategy.needs_features and hasattr(objective, "features"):
        objective.features = True
    return strategy


def prepare_model(bench: Benchmark, strategy: Strategy, device: torch.device, strategy_state: dict | None = None):
    """A fresh model on ``device``, set up by the strategy. The model moves first and ``setup``
    runs after, so whatever ``setup`` snapshots (ZSCL's pre-trained teacher, new adapters) lives on
    the model's device (issue 17: a teacher taken before ``model.to(cuda)`` stayed on the CPU)."""
    model = bench.build_model().to(device)
    if strategy_state is not None:
        strategy.load_state_dict(strategy_state)
    model = strategy.setup(model)
    return model.to(device)


def run_continual(recipe, resume: bool = False, *, stop_after: int | None = None, log=print, stop_flag=None) -> dict:
    """Run the recipe's task sequence. Returns R, b, the metrics and the report paths.

    ``stop_after``: stop once this many tasks are finished (the state is saved; ``resume``
    continues the run). ``stop_flag`` (polled after every optimizer step) ends the run inside a
    task, which ``resume`` then redoes. The report is written when the last task is done.
    """
    cc = recipe.continual
    if cc is None:
        raise ConfigError("the recipe has no `continual` section (see `mmtune config copy continual-digits`)")
    threads = torch.get_num_threads()
    if cc.torch_threads:
        torch.set_num_threads(cc.torch_threads)
    try:
        return _run(recipe, cc, resume, stop_after, log, stop_flag)
    finally:
        torch.set_num_threads(threads)


def _run(recipe, cc, resume: bool, stop_after: int | None, log, stop_flag=None) -> dict:
    out = Path(recipe.train.output_dir)
    cdir = out / "continual"
    fingerprint = _fingerprint(recipe)
    state = load_state(cdir) if resume else None
    if resume:
        if state is None:
            raise MMTuneError(f"--resume: no finished task saved in {cdir / 'state'}; run without --resume")
        changed = _diff_keys(state["fingerprint"], fingerprint)
        if changed:
            raise MMTuneError(f"--resume: the recipe changed since the run started ({', '.join(changed[:5])}); "
                              "restore it or start over without --resume")
    else:
        shutil.rmtree(cdir, ignore_errors=True)
        shutil.rmtree(out / "tasks", ignore_errors=True)

    device = _device(cc.device)
    seed = recipe.train.seed
    bench = build_benchmark(recipe)
    T = len(bench.tasks)
    strategy = build_strategy(recipe, bench, device, cdir, log)
    objective = strategy.ctx.objective

    seed_everything(seed)
    model = prepare_model(bench, strategy, device, state["strategy"] if state is not None else None)
    if state is not None:
        _load_weights(model, state["dir"] / "weights.safetensors")
        progress = state["progress"]
        log(f"resuming after task {len(progress['R'])}/{T} from {state['dir']}")
    else:
        progress = {"b": None, "R": [], "losses": [], "curves": [], "trained": [], "steps": []}
    trained = set(progress["trained"])
    opt_states = state["optimizer"] if state is not None else {}

    def _eval():
        return evaluate_all(bench, strategy, model, cc.eval_batch_size)

    if progress["b"] is None:
        progress["b"] = _eval()
        progress["P"] = [bench.evaluate_probes(model)]
        progress["seen_b"] = evaluate_all(bench, strategy, model, cc.eval_batch_size, seen=True)
        log("before training: " + _fmt(bench.tasks, progress["b"]) + _fmt_probes(bench, progress["P"][-1]))
    for t in range(len(progress["R"]), T):
        if stop_after is not None and t >= stop_after:
            break
        task: TaskData = bench.tasks[t]
        rows = strategy.train_rows(task.info, task.train, [bench.tasks[j].train for j in range(t + 1)])
        strategy.before_task(model, task.info)
        bench.before_task(model, task.info)
        trained |= {n for n, p in model.named_parameters() if p.requires_grad}
        cfg = recipe.train.model_copy(update={"output_dir": str(out / "tasks" / f"{t + 1:02d}-{_slug(task.info.name)}"),
                                              "seed": seed + t})
        plugins: list = [strategy]
        if cc.curve_every:
            plugins.append(CurvePlugin(_eval, cc.curve_every, t, progress["curves"]))
        trainer = Trainer(model, objective, rows, bench.collate, cfg, plugins=plugins, device=device,
                          optimizer_groups=strategy.optimizer_groups(model), stop_flag=stop_flag)
        if cc.keep_optimizer_state and opt_states:
            load_param_states(model, trainer.optimizer, opt_states)
        res = trainer.fit()
        if res.get("stopped"):
            log(f"stopped in task {t + 1}/{T} '{task.info.name}'; --resume redoes it")
            break
        if cc.keep_optimizer_state:
            opt_states = param_states(model, trainer.optimizer)
        progress.setdefault("terms", []).append(_mean_terms(trainer.history, res["losses"]))
        strategy.after_task(model, task.info, task.train)
        row = _eval()
        progress["R"].append(row)
        progress.setdefault("P", []).append(bench.evaluate_probes(model))
        progress.setdefault("R_seen", []).append(evaluate_all(bench, strategy, model, cc.eval_batch_size, seen=True))
        progress["losses"].append(res["losses"])
        progress["steps"].append(res["steps"])
        progress["trained"] = sorted(trained)
        save_state(cdir, model, trained, strategy, progress, fingerprint, opt_states)
        log(f"task {t + 1}/{T} '{task.info.name}': {res['steps']} steps, final loss {res['final_loss']:.4f}; "
            + _fmt(bench.tasks, row) + _fmt_probes(bench, progress["P"][-1]))

    finished = len(progress["R"]) == T
    result = {"tasks": [t.info.name for t in bench.tasks], "strategy": cc.strategy.label, "scenario": cc.scenario,
              "benchmark": cc.benchmark, "b": progress["b"], "R": progress["R"], "finished": finished,
              "losses": progress["losses"], "steps": progress["steps"], "curves": progress["curves"],
              "terms": progress.get("terms", []),
              "metric_names": [t.metric for t in bench.tasks], "output_dir": str(out),
              "eval_overlap": [t.eval_overlap for t in bench.tasks],
              "probes": bench.probe_names(), "P": progress.get("P", []),
              "R_seen": [r for r in progress.get("R_seen", []) if r], "b_seen": progress.get("seen_b") or None,
              "strategy_state": _strategy_summary(strategy)}
    if finished:
        from .report import write_report

        reference = load_reference(cc.intransigence_reference, T)
        result["metrics"] = summarize(progress["R"], progress["b"], fwt_defined=bench.fwt_defined,
                                      reference=reference, learned_threshold=cc.learned_threshold)
        if result["R_seen"]:
            result["metrics_seen"] = summarize(result["R_seen"], result["b_seen"], fwt_defined=bench.fwt_defined,
                                               learned_threshold=cc.learned_threshold)
        result["report"] = write_report(out, result) if cc.report else {}
        m = result["metrics"]
        log(f"done: ACC {m['acc']:.3f}, BWT {_num(m['bwt'])}, FWT {_num(m['fwt'])}, forgetting "
            f"{_num(m['forgetting'])}, plasticity {m['plasticity']:.3f}"
            + (f"; report {result['report']['markdown']}" if cc.report else ""))
        if m["unlearned_tasks"]:
            log("warning: never learned (R[j][j] < continual.learned_threshold "
                f"{cc.learned_threshold:g}): {', '.join(result['tasks'][j] for j in m['unlearned_tasks'])}; "
                "the forgetting of this run is not meaningful")
    result["model"] = model
    return result


def _mean_terms(history: list[dict], losses: list[float]) -> dict[str, float]:
    """Per task: the mean over its steps of the task loss and of each strategy's loss term."""
    sums: dict[str, list[float]] = {}
    for h in history:
        for k, v in h.items():
            if k not in _STEP_KEYS and isinstance(v, (int, float)):
                sums.setdefault(k, []).append(float(v))
    out = {"loss": sum(losses) / len(losses)} if losses else {}
    return {**out, **{k: sum(v) / len(v) for k, v in sums.items()}}


#: Trainer metrics that are not loss terms.
_STEP_KEYS = {"step", "loss", "lr", "tokens", "epoch", "grad_norm", "skipped", "tokens_per_s"}


def _strategy_summary(strategy: Strategy) -> dict:
    """Small, JSON-able facts about the strategy's run (EWC lambda scaling, A-GEM projections)."""
    if isinstance(strategy, Composite):
        return {m.name: _strategy_summary(m) for m in strategy.members}
    out = {}
    for key in ("scale", "events", "projections", "steps"):
        if hasattr(strategy, key):
            out[key] = getattr(strategy, key)
    buf = getattr(strategy, "buffer", None)
    if buf is not None:
        out["buffer"] = {"size": len(buf), "seen": buf.seen, "bytes": buf.nbytes()}
    return out


def _num(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _fmt_probes(bench: Benchmark, values: list[float]) -> str:
    return "".join(f"; {n} {v:.3f}" for n, v in zip(bench.probe_names(), values))


def _fmt(tasks: list[TaskData], accs: list[float]) -> str:
    return ", ".join(f"{t.info.name} {a:.3f}" for t, a in zip(tasks, accs))
