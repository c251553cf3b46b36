"""`mmtune train RECIPE`: build the model, the data and the loop from a recipe and run it.

Causal-LM objectives (sft, pretrain, dpo) run here; encoder objectives are delegated to
mmtune.encoders.run. The final weights go to ``OUTPUT/final`` (same layout as a checkpoint),
which ``mmtune export``, ``merge``, ``chat`` and ``eval`` take.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from ..config import Recipe
from ..errors import MMTuneError
from .checkpoint import latest_checkpoint
from .loop import Trainer, seed_everything
from .objectives import OBJECTIVES

CAUSAL_OBJECTIVES = {"sft", "pretrain", "dpo", "sft-fused"}


def is_encoder_objective(name: str) -> bool:
    return name not in CAUSAL_OBJECTIVES


def prepare_output_dir(out: Path, resume, overwrite: bool) -> None:
    """A fresh run refuses to mix with an old one; ``--overwrite`` clears it."""
    if resume:
        return
    if latest_checkpoint(out) is not None or (out / "metrics.jsonl").exists():
        if not overwrite:
            raise MMTuneError(f"{out} already holds a run; use --resume to continue it or --overwrite to start over")
        for name in ("checkpoints", "final", "tb"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def make_generate_fn(tokenizer, template, max_new_tokens: int):
    from ..evaluation import greedy_answers

    def generate(model, prompt: str) -> str:
        return greedy_answers(model, tokenizer, template, [[{"role": "user", "content": prompt}]], max_new_tokens)[0]

    return generate


def build_causal_data(recipe: Recipe, tokenizer, log=print):
    """Tokenized (and packed) train/eval rows and the collate function for a causal LM."""
    from ..data.packing import collate_packed, collate_padded, pack_examples, packing_efficiency
    from ..data.tokenize import build_datasets

    train_ex, eval_ex, report = build_datasets(recipe.data, tokenizer, recipe.objective, recipe.train.seed)
    for line in report.lines():
        log(line)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if recipe.data.packing:
        rows = pack_examples(train_ex, recipe.data.max_length)
        eval_rows = pack_examples(eval_ex, recipe.data.max_length) if eval_ex else None
        log(f"packing: {len(train_ex)} samples -> {len(rows)} rows of {recipe.data.max_length} tokens, "
            f"efficiency {packing_efficiency(rows, recipe.data.max_length):.1%}")
        collate = partial(collate_packed, pad_id=pad_id)
    else:
        rows, eval_rows = train_ex, (eval_ex or None)
        collate = partial(collate_padded, pad_id=pad_id)
    return rows, eval_rows, collate


def build_preference_data(recipe: Recipe, template, log=print):
    from ..data.preference import build_preference_datasets, collate_pairs

    train, ev, report = build_preference_datasets(recipe.data, template, recipe.train.seed)
    for line in report.lines():
        log(line)
    tok = template.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return train, (ev or None), partial(collate_pairs, pad_id=pad_id)


def make_dpo_objective(recipe: Recipe, model, rows, collate, log=print, eval_rows=()):
    """DPO against the frozen starting model: the base with adapters disabled for LoRA, a frozen
    copy for full fine-tuning; reference log-probs optionally precomputed once (for the training
    and the eval pairs, after which the frozen copy is released)."""
    import copy

    from .dpo import DPOObjective, precompute_reference_logps

    ref_model = None
    if recipe.adapter.type == "none":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        log("dpo: full fine-tuning, reference = a frozen copy of the starting model")
    cfg = recipe.dpo
    if cfg.precompute_ref:
        for part in (rows, eval_rows):
            precompute_reference_logps(model, part, collate, recipe.train.batch_size, ref_model,
                                       progress=recipe.train.progress)
        ref_model = None  # no longer needed: the batches carry ref_logps
    return DPOObjective(cfg.beta, cfg.loss_type, cfg.label_smoothing, ref_model, cfg.sft_weight)


#: Workflows whose set-up joins a process group and trains data-parallel.
DISTRIBUTED_WORKFLOWS = ("causal",)


def refuse_distributed(recipe: Recipe, world_size: int) -> None:
    """One clear line instead of ``world_size`` identical copies of a one-process workflow."""
    wf = recipe.resolved_workflow
    if world_size > 1 and wf not in DISTRIBUTED_WORKFLOWS:
        raise MMTuneError(f"--nproc {world_size} / torchrun: {wf} recipes train in one process only (each of the "
                          f"{world_size} processes would run the same copy); run without --nproc. Several "
                          f"processes: {', '.join(DISTRIBUTED_WORKFLOWS)} recipes")


def run_recipe(recipe: Recipe, resume=False, overwrite: bool = False, log=print, stop_flag=None) -> dict:
    """Run ``recipe``: multimodal stages, encoder objectives, or causal-LM training (one process
    or several under torchrun, per ``recipe.distributed``)."""
    import os

    refuse_distributed(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    if recipe.resolved_workflow == "multimodal":
        from ..multimodal.run import run_multimodal_recipe

        return run_multimodal_recipe(recipe, resume=resume, overwrite=overwrite, log=log, stop_flag=stop_flag)
    if recipe.resolved_workflow == "encoder":
        from ..encoders.run import run_encoder_recipe

        return run_encoder_recipe(recipe, resume=resume, log=log, stop_flag=stop_flag)
    from ..data.templates import get_template
    from ..distributed import barrier, cleanup, init_distributed, is_main_process, train_in_bf16, wrap_model
    from ..models.adapters import trainable_summary
    from ..models.loading import load_model, load_tokenizer, resolve_model_path

    ctx = init_distributed(recipe.distributed)
    main = is_main_process()
    if not main:
        log = lambda *a, **k: None  # noqa: E731 - only rank 0 logs
    out = Path(recipe.train.output_dir)
    if main:
        prepare_output_dir(out, resume, overwrite)
    seed_everything(recipe.train.seed)  # LoRA initialisation is seeded too
    base_dir = resolve_model_path(recipe.model.path) if main else None
    barrier()  # rank 0 builds the built-in model / tokenization cache first
    base_dir = base_dir or resolve_model_path(recipe.model.path)
    tokenizer = load_tokenizer(base_dir)
    template = get_template(recipe.data.template, tokenizer, recipe.data.system_prompt)
    if recipe.objective == "dpo":
        rows, eval_rows, collate = build_preference_data(recipe, template, log)
    else:
        if not main:
            barrier()
        rows, eval_rows, collate = build_causal_data(recipe, tokenizer, log)
        if main:
            barrier()
    model = load_model(recipe.model, recipe.adapter, training=True)
    if recipe.model.quantization == "none":
        model = model.to(ctx.device)
    log(trainable_summary(model))
    if recipe.objective == "dpo":
        objective = make_dpo_objective(recipe, model, rows, collate, log, eval_rows or ())
    else:
        objective = OBJECTIVES.get(recipe.objective)()
    par = wrap_model(model, recipe.distributed, ctx, train_cfg=recipe.train,
                     bf16=train_in_bf16(recipe.train.precision, ctx.device))
    if ctx.world_size > 1:
        log(f"distributed: {par.strategy} over {ctx.world_size} processes")
    trainer = Trainer(par.model, objective, rows, collate, recipe.train, eval_rows=eval_rows, tokenizer=tokenizer,
                      generate_fn=make_generate_fn(tokenizer, template, recipe.train.max_new_tokens),
                      recipe=recipe.model_dump(mode="json"), stop_flag=stop_flag, train_module=par.train_module,
                      device=ctx.device,
                      meta={"adapter": recipe.adapter.type, "base_model": str(base_dir),
                            "template": recipe.data.template, "objective": recipe.objective})
    par.attach(trainer)
    result = trainer.fit(resume=resume)
    final = trainer.save(name="final")
    cleanup()
    log(f"done: {result['steps']} steps, final loss {result['final_loss']:.4f}"
        + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "")
        + (f", {result['skipped_steps']} skipped (NaN)" if result["skipped_steps"] else ""))
    for s in result.get("samples", []):
        log(f"  > {s['prompt']!r} -> {s['output']!r}")
    log(f"final weights: {final}   chat: mmtune chat {final}")
    return {**result, "final_dir": str(final), "trainer": trainer}
