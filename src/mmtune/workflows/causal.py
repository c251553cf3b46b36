"""The ``causal`` workflow: a causal LM trained with SFT, continued pretraining or DPO, in one
process or data-parallel under torchrun (DDP, FSDP2, DeepSpeed ZeRO per ``recipe.distributed``).

The final weights go to ``OUTPUT/final`` (same layout as a checkpoint), which ``mmtune export``,
``merge``, ``chat`` and ``eval`` take.
"""

from __future__ import annotations

from functools import partial

from ..data.packing import collate_packed, collate_padded, pack_examples, packing_efficiency
from ..data.preference import build_preference_datasets, collate_pairs
from ..data.templates import get_template
from ..data.tokenize import build_datasets
from ..distributed import barrier, train_in_bf16, wrap_model
from ..evaluation import eval_causal
from ..models.adapters import trainable_summary
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..registry import WORKFLOWS
from ..train.fast_path import (
    causal_collate,
    compile_decoder,
    fused_objective,
    plan_for_recipe,
    run_work_flop,
    settle_compile,
)
from ..train.loop import Trainer, planned_steps, seed_everything
from ..train.objectives import OBJECTIVES
from ..train.scoring import greedy_answers
from .base import RunContext, Workflow


def make_generate_fn(tokenizer, template, max_new_tokens: int):
    def generate(model, prompt: str) -> str:
        return greedy_answers(model, tokenizer, template, [[{"role": "user", "content": prompt}]], max_new_tokens)[0]

    return generate


def build_causal_data(recipe, tokenizer, log=print, plan=None):
    """Tokenized (and packed) train/eval rows and the collate function for a causal LM (with the
    flash varlen boundaries when the speed ``plan`` says so, see :func:`causal_collate`)."""
    train_ex, eval_ex, report = build_datasets(recipe.data, tokenizer, recipe.objective, recipe.train.seed)
    for line in report.lines():
        log(line)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if recipe.data.packing:
        rows = pack_examples(train_ex, recipe.data.max_length)
        eval_rows = pack_examples(eval_ex, recipe.data.max_length) if eval_ex else None
        log(f"packing: {len(train_ex)} samples -> {len(rows)} rows of {recipe.data.max_length} tokens, "
            f"efficiency {packing_efficiency(rows, recipe.data.max_length):.1%}")
    else:
        rows, eval_rows = train_ex, (eval_ex or None)
    if plan is not None:
        collate = causal_collate(plan, pad_id)
    else:  # callers without a speed plan: packed rows marked by position_ids (the CPU path)
        collate = partial(collate_packed if recipe.data.packing else collate_padded, pad_id=pad_id)
    return rows, eval_rows, collate


def build_preference_data(recipe, template, log=print):
    train, ev, report = build_preference_datasets(recipe.data, template, recipe.train.seed)
    for line in report.lines():
        log(line)
    tok = template.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return train, (ev or None), partial(collate_pairs, pad_id=pad_id)


def make_dpo_objective(recipe, model, rows, collate, log=print, eval_rows=()):
    """The DPO objective of ``recipe`` (see :meth:`mmtune.train.dpo.DPOObjective.from_recipe`)."""
    return OBJECTIVES.get("dpo").from_recipe(recipe, model, rows, collate, log, eval_rows)


def build_causal_model(recipe, plan, log=print, n_rows: int | None = None, world_size: int = 1):
    """The model a causal run trains: loaded with the speed plan's dtype, attention kernel and
    checkpointing, adapted, on the plan's device, its decoder compiled when the plan says so.
    Returns ``(model, plan)``: with ``n_rows`` (the training rows) the plan's compile choice is
    settled from the run's work (``train.compile: auto`` on CPU, :func:`settle_compile`)."""
    model = load_model(recipe.model, recipe.adapter, training=True, **plan.load_kwargs())
    if recipe.model.quantization == "none":
        model = model.to(plan.device)
    if n_rows is not None:
        n_params = sum(p.numel() for p in model.parameters())
        tokens = recipe.train.batch_size * recipe.train.grad_accum * world_size * recipe.data.max_length
        plan = settle_compile(plan, recipe, run_work_flop(n_params, planned_steps(recipe.train, n_rows, world_size),
                                                          tokens), world_size)
    if plan.compile:
        compile_decoder(model)
    log(trainable_summary(model))
    return model, plan


def build_causal_trainer(recipe, plan, dist, rows, collate, *, eval_rows=None, log=print, **trainer_kwargs) -> Trainer:
    """Model (:func:`build_causal_model`), objective (the fused loss when the plan says so),
    distributed wrapper and :class:`Trainer` of a causal run: ``mmtune train`` and
    ``benchmarks/gpu_sft.py`` both build their run here. ``trainer_kwargs`` go to the Trainer
    (tokenizer, generate_fn, stop_flag, meta); checkpoints carry ``recipe``. The plan, its compile
    choice settled (:func:`build_causal_model`), is logged here and kept as ``trainer.speed_plan``."""
    model, plan = build_causal_model(recipe, plan, log, n_rows=len(rows), world_size=dist.world_size)
    for line in plan.lines():
        log(line)
    objective_cls = OBJECTIVES.get(recipe.objective)
    objective = (fused_objective(plan) if plan.fused
                 else objective_cls.from_recipe(recipe, model, rows, collate, log, eval_rows or ()))
    par = wrap_model(model, recipe.distributed, dist, train_cfg=recipe.train,
                     bf16=train_in_bf16(recipe.train.precision, dist.device))
    if dist.world_size > 1:
        log(f"distributed: {par.strategy} over {dist.world_size} processes")
    trainer = Trainer(par.model, objective, rows, collate, recipe.train, eval_rows=eval_rows,
                      recipe=recipe.model_dump(mode="json"), train_module=par.train_module, device=dist.device,
                      **trainer_kwargs)
    par.attach(trainer)
    trainer.speed_plan = plan
    return trainer


@WORKFLOWS.register("causal")
class CausalWorkflow(Workflow):
    name = "causal"
    supports_distributed = True

    def run(self, recipe, ctx: RunContext) -> dict:
        dist, log = ctx.dist, ctx.log
        main = dist.is_main
        seed_everything(recipe.train.seed)  # LoRA initialisation is seeded too
        base_dir = resolve_model_path(recipe.model.path) if main else None
        barrier()  # rank 0 builds the built-in model / tokenization cache first
        base_dir = base_dir or resolve_model_path(recipe.model.path)
        tokenizer = load_tokenizer(base_dir)
        template = get_template(recipe.data.template, tokenizer, recipe.data.system_prompt)
        objective_cls = OBJECTIVES.get(recipe.objective)
        plan = plan_for_recipe(recipe, dist.device, dist.world_size)  # compile settled with the model
        if objective_cls.data == "pairs":
            rows, eval_rows, collate = build_preference_data(recipe, template, log)
        else:
            if not main:
                barrier()
            rows, eval_rows, collate = build_causal_data(recipe, tokenizer, log, plan=plan)
            if main:
                barrier()
        trainer = build_causal_trainer(
            recipe, plan, dist, rows, collate, eval_rows=eval_rows, log=log, tokenizer=tokenizer,
            generate_fn=make_generate_fn(tokenizer, template, recipe.train.max_new_tokens),
            stop_flag=ctx.stop_flag, meta={"adapter": recipe.adapter.type, "base_model": str(base_dir),
                  "template": recipe.data.template, "objective": recipe.objective})
        result = trainer.fit(resume=ctx.resume)
        final = trainer.save(name="final")
        log(f"done: {result['steps']} steps, final loss {result['final_loss']:.4f}"
            + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "")
            + (f", {result['skipped_steps']} skipped (NaN)" if result["skipped_steps"] else ""))
        for s in result.get("samples", []):
            log(f"  > {s['prompt']!r} -> {s['output']!r}")
        log(f"final weights: {final}   chat: mmtune chat {final}")
        return {**result, "final_dir": str(final), "trainer": trainer, "speed_plan": trainer.speed_plan}

    def evaluate(self, recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
        return eval_causal(recipe, checkpoint, max_new_tokens)
