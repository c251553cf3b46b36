"""`mmtune train RECIPE` for a recipe with a ``multimodal`` section: the stages, in order.

Each stage is a complete run of :class:`mmtune.train.loop.Trainer` in
``OUTPUT/stages/NN-NAME/`` (checkpoints, metrics.jsonl, ``trainable_parameters.txt``), on
the stage's own data, with the stage's trainability (:func:`~mmtune.multimodal.stages.apply_stage`)
and per-component learning rates. The composed model is saved after every stage
(``OUTPUT/stages/NN-NAME/composed``) and at the end (``OUTPUT/final``), in the layout
:func:`~mmtune.multimodal.model.load_composed` reads.

Samples whose route reaches no trainable parameter in a stage (e.g. text-only samples, which
run the frozen base model, in a LoRA_V stage) would contribute no gradient; they are removed
from that stage and counted in the log.

``resume=True`` starts from the last stage whose composed model was saved and continues an
interrupted stage from its latest checkpoint (same losses as an uninterrupted run).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..config import Recipe
from ..data.templates import get_template
from ..data.tokenize import effective_loss_on
from ..errors import ConfigError, MMTuneError
from ..train.checkpoint import latest_checkpoint
from ..train.loop import Trainer, seed_everything
from .config import StageConfig
from .data import LengthPolicy, MediaCache, build_mm_examples, collate_mm, pack_mm_examples
from .model import CONFIG_FILE, ComposedModel, build_composed_model, find_composed, load_composed  # noqa: F401
from .objective import MultimodalObjective
from .preference import MultimodalDPOObjective, build_mm_pairs, collate_mm_pairs, precompute_mm_reference
from .stages import apply_stage

MM_OBJECTIVES = ("sft", "pretrain", "dpo")


def stage_dir(output_dir: str | Path, index: int, stage: StageConfig) -> Path:
    return Path(output_dir) / "stages" / f"{index + 1:02d}-{stage.name}"


def _stage_train_config(recipe: Recipe, index: int, stage: StageConfig):
    update = {"output_dir": str(stage_dir(recipe.train.output_dir, index, stage))}
    if stage.max_steps is not None:
        update["max_steps"] = stage.max_steps
    if stage.epochs is not None:
        update["epochs"] = stage.epochs
        if stage.max_steps is None:
            update["max_steps"] = None
    if stage.batch_size is not None:
        update["batch_size"] = stage.batch_size
    if stage.warmup_steps is not None:
        update["warmup_steps"] = stage.warmup_steps
    return recipe.train.model_copy(update=update)


def _prepare(out: Path, resume: bool, overwrite: bool) -> None:
    if resume or not (out / "stages").exists():
        return
    if not overwrite:
        raise MMTuneError(f"{out} already holds a multimodal run; use --resume to continue it or --overwrite to "
                          "start over")
    for name in ("stages", "final"):
        shutil.rmtree(out / name, ignore_errors=True)


def _completed(recipe: Recipe) -> int:
    """Number of leading stages whose composed model was saved."""
    n = 0
    for i, stage in enumerate(recipe.multimodal.stages):
        if not (stage_dir(recipe.train.output_dir, i, stage) / "composed" / CONFIG_FILE).is_file():
            break
        n = i + 1
    return n


def build_stage_data(recipe: Recipe, stage: StageConfig, model: ComposedModel, template, cache=None, log=print):
    """``(train_rows, eval_rows, collate_fn, report)`` of one stage (rows packed when data.packing)."""
    data = recipe.data
    policy = LengthPolicy(data.max_length, data.truncation, effective_loss_on(recipe.objective, data.loss_on))
    train, report = build_mm_examples(stage.sources, model, template, policy, data.on_bad_record, recipe.train.seed,
                                      cache)
    for line in report.lines():
        log(line)
    evals = []
    if stage.eval_sources:
        evals, ereport = build_mm_examples(stage.eval_sources, model, template, policy, data.on_bad_record,
                                           recipe.train.seed, cache)
        log("eval " + ereport.lines()[0])
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if data.packing:
        train, evals = pack_mm_examples(train, data.max_length), pack_mm_examples(evals, data.max_length)
    return train, (evals or None), partial(collate_mm, pad_id=pad), report


def build_stage_pairs(recipe: Recipe, stage: StageConfig, model: ComposedModel, template, cache=None, log=print):
    """``(train_pairs, eval_pairs, collate_fn, objective, n_pairs)`` of a DPO stage (pairs are
    never packed: chosen and rejected run side by side)."""
    data, dpo = recipe.data, recipe.dpo
    policy = LengthPolicy(data.max_length, data.truncation, "last_turn")
    train = build_mm_pairs(stage.sources, model, template, policy, data.on_bad_record, recipe.train.seed, cache, log)
    evals = (build_mm_pairs(stage.eval_sources, model, template, policy, data.on_bad_record, recipe.train.seed,
                            cache, lambda m: log("eval " + m)) if stage.eval_sources else [])
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    objective = MultimodalDPOObjective(dpo.beta, dpo.loss_type, dpo.label_smoothing, dpo.sft_weight)
    return train, (evals or None), partial(collate_mm_pairs, pad_id=pad), objective, len(train)


def run_multimodal_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False, log=print,
                          on_stage_end: Callable | None = None, cache_root: str | Path | None = None,
                          stop_flag: Callable[[], bool] | None = None) -> dict:
    """Run every stage of ``recipe.multimodal`` in order; returns per-stage results and the final dir.

    ``on_stage_end(name, result, model)`` is called once before the first stage (name
    ``"before"``, result None) and after each stage (the demo evaluates there). ``stop_flag``
    (checked after every optimizer step, e.g. set by Ctrl-C) ends the run after a checkpoint;
    ``resume=True`` continues it. ``cache_root``: where builtin encoders are built.
    """
    mm = recipe.multimodal
    if mm is None:
        raise ConfigError("the recipe has no `multimodal` section")
    if recipe.objective not in MM_OBJECTIVES:
        raise ConfigError(f"objective '{recipe.objective}' is not available for multimodal recipes; use one of "
                          f"{', '.join(MM_OBJECTIVES)}")
    out = Path(recipe.train.output_dir)
    _prepare(out, resume, overwrite)
    seed_everything(recipe.train.seed)
    start = _completed(recipe) if resume else 0
    if start:
        prev = stage_dir(out, start - 1, mm.stages[start - 1]) / "composed"
        log(f"resume: stages 1-{start} done; loading {prev}")
        model = load_composed(prev, dtype=recipe.model.dtype, device="cpu", trainable=True)
    else:
        model = build_composed_model(mm, recipe.model, cache_root, seed=recipe.train.seed)
    template = get_template(recipe.data.template, model.tokenizer, recipe.data.system_prompt)
    cache = MediaCache(model)
    if on_stage_end is not None and start == 0:
        on_stage_end("before", None, model)
    results = []
    for i in range(start, len(mm.stages)):
        stage = mm.stages[i]
        cfg = _stage_train_config(recipe, i, stage)
        sdir = Path(cfg.output_dir)
        sdir.mkdir(parents=True, exist_ok=True)
        log(f"[stage {i + 1}/{len(mm.stages)}] {stage.name}")
        if recipe.objective == "dpo":
            rows, eval_rows, collate, objective, n_examples = build_stage_pairs(recipe, stage, model, template, cache,
                                                                                log)
        else:
            rows, eval_rows, collate, report = build_stage_data(recipe, stage, model, template, cache, log)
            objective, n_examples = MultimodalObjective(), report.examples
        plan = apply_stage(model, stage, recipe.train.lr, log_fn=log)
        (sdir / "trainable_parameters.txt").write_text("\n".join(plan.trainable) + "\n")
        rows, skipped = _drop_untrained(rows, model, plan)
        eval_rows, _ = _drop_untrained(eval_rows or [], model, plan)
        if skipped:
            log(f"  {sum(skipped.values())} rows route through nothing this stage trains and are left out: "
                + ", ".join(f"{g} {n}" for g, n in sorted(skipped.items())))
        model.router.reset_counts()
        if recipe.objective == "dpo":  # the reference is the model as this stage starts
            precompute_mm_reference(model, rows + (eval_rows or []), collate, cfg.batch_size, progress=cfg.progress)
        trainer = Trainer(model, objective, rows, collate, cfg, eval_rows=eval_rows or None,
                          optimizer_groups=plan.groups, tokenizer=model.tokenizer,
                          recipe=recipe.model_dump(mode="json"),
                          meta={"kind": "composed", "stage": stage.name, "objective": recipe.objective,
                                "base_model": getattr(model, "base_model_path", "")},
                          stop_flag=stop_flag)
        result = trainer.fit(resume=bool(resume and latest_checkpoint(sdir) is not None))
        log(f"  {model.router.summary()}")
        if result["stopped"]:
            log(f"  stopped at step {result['steps']} of stage '{stage.name}'; continue with --resume")
            return {"stages": results + [{"stage": stage.name, **result}], "final_dir": None, "model": model,
                    "stopped": True}
        composed = model.save(sdir / "composed")
        log(f"  stage done: {result['steps']} steps, final loss {result['final_loss']:.4f}"
            + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "") + f"; saved {composed}")
        results.append({"stage": stage.name, "trainable": plan.count, "examples": n_examples,
                        **{k: v for k, v in result.items() if k != "samples"}})
        if on_stage_end is not None:
            on_stage_end(stage.name, result, model)
    final = model.save(out / "final")
    log(f"final composed model: {final}")
    return {"stages": results, "final_dir": str(final), "model": model, "stopped": False}


def evaluate_stages(recipe: Recipe, model: ComposedModel, template, batch_size: int = 8) -> dict:
    """``eval_loss/STAGE`` (mean loss per supervised token on the stage's ``eval_sources``) for
    every stage that has them, and ``eval_loss`` over all of them."""
    import torch

    objective, cache, out = MultimodalObjective(), MediaCache(model), {}
    total = count = 0.0
    model.eval()
    device = next(model.parameters()).device
    for stage in recipe.multimodal.stages:
        if not stage.eval_sources:
            continue
        evals, _, collate, _ = build_stage_data(recipe, stage.model_copy(update={"sources": stage.eval_sources}),
                                                model, template, cache, log=lambda *_: None)
        s = n = 0.0
        with torch.no_grad():
            for i in range(0, len(evals), batch_size):
                batch = _to(collate(evals[i:i + batch_size]), device)
                res = objective(model, batch)
                s, n = s + float(res.loss_sum), n + float(res.count)
        out[f"eval_loss/{stage.name}"] = s / max(n, 1.0)
        total, count = total + s, count + n
    if count:
        out["eval_loss"] = total / count
    return out


def _to(batch, device):
    import torch

    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _drop_untrained(rows, model: ComposedModel, plan) -> tuple[list, dict]:
    kept, skipped = [], {}
    for r in rows:
        route = model.router.route(r["group"], n_samples=0)
        if plan.trains_route(route):
            kept.append(r)
        else:
            skipped[r["group"]] = skipped.get(r["group"], 0) + 1
    return kept, skipped
