"""Run an encoder recipe end to end: data, tokenizer, model, the shared training loop, evaluation.

One file per step: :mod:`.prepare` (tokenizer and rows), :mod:`.network` (the model),
:mod:`.evaluate`, :mod:`.export` (``final/``); the entry points are here, and every name is
importable from ``mmtune.encoders.run``.

``mmtune train RECIPE`` calls :func:`run_encoder_recipe` when the recipe's objective is one of
:data:`mmtune.encoders.ENCODER_OBJECTIVES`; ``mmtune eval`` calls :func:`eval_encoder`.

Output directory (``train.output_dir``)::

    checkpoints/step-*/   the loop's checkpoints (model/ = EncoderModule.save_pretrained, tokenizer/)
    metrics.jsonl         the loop's log
    final/                encoder.json + model.safetensors (every weight, heads and LoRA included),
                          tokenizer/, recipe.yaml, metrics.json, and hf/: a plain Hugging Face
                          directory (LoRA merged) with the tokenizer, usable as ``model.path`` of
                          a downstream recipe or with ``AutoModel.from_pretrained``. ELECTRA: hf/ is
                          the discriminator, hf-generator/ the generator.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import Recipe, SourceConfig, load_recipe
from ...errors import ConfigError
from ...train.checkpoint import latest_checkpoint
from ...train.loop import Trainer
from .. import ENCODER_OBJECTIVES
from ..config import EncoderConfig
from ..models import load_encoder_module, trainable_summary
from ..objectives import build_objective
from ..tokenizer import load_tokenizer
from .evaluate import evaluate_prepared, evaluate_pretraining  # noqa: F401
from .export import export_final  # noqa: F401
from .network import build_encoder_module  # noqa: F401
from .prepare import (  # noqa: F401
    PRETRAIN_OBJECTIVES,
    TASK_OF,
    Prepared,
    prepare,
    prepare_downstream,
    prepare_pretraining,
    resolve_tokenizer,
)


def _check(recipe: Recipe) -> None:
    if recipe.objective not in ENCODER_OBJECTIVES:
        raise ConfigError(f"objective '{recipe.objective}' is not an encoder objective; encoder objectives: "
                          + ", ".join(ENCODER_OBJECTIVES))


def run_encoder_recipe(recipe: Recipe, resume: bool | str = False, log=print, stop_flag=None) -> dict:
    """Train the recipe with the shared loop, evaluate, export ``final/``; returns the loop's result
    dict plus ``eval`` (task metrics), ``data`` (counts), ``final_dir``, parameter counts."""
    _check(recipe)
    cfg = recipe.train
    out = Path(cfg.output_dir)
    resume_dir = None
    if resume:
        resume_dir = latest_checkpoint(out) if resume is True else Path(resume)
    torch.manual_seed(cfg.seed)
    prep = prepare(recipe, resume_dir=resume_dir)
    module = build_encoder_module(recipe, prep)
    if torch.cuda.is_available():
        module.to("cuda")
    summary = trainable_summary(module)
    enc = recipe.encoder or EncoderConfig()
    log(f"[mmtune] {recipe.objective}: {len(prep.train_rows)} training rows, {len(prep.eval_rows)} eval rows; "
        f"data {prep.report}; trainable {summary['trainable_params']:,} of {summary['params']:,} parameters"
        + (f"; newly initialised: {module.spec['new_weights']}" if module.spec.get("new_weights") else ""))
    trainer = Trainer(module, build_objective(recipe.objective, enc), prep.train_rows, prep.collate, cfg,
                      eval_rows=prep.eval_rows or None, tokenizer=prep.tokenizer,
                      recipe=recipe.model_dump(mode="json"),
                      meta={"encoder": module.spec["kind"], "objective": recipe.objective,
                            "base_model": recipe.model.path, "adapter": recipe.adapter.type}, stop_flag=stop_flag)
    result = trainer.fit(resume=resume)
    metrics = evaluate_prepared(module, prep, recipe)
    final = export_final(module, prep.tokenizer, recipe, out / "final", metrics)
    return {**result, "eval": metrics, "data": prep.report, "final_dir": str(final), "output_dir": str(out),
            "trainable_params": summary["trainable_params"], "params": summary["params"]}


def encoder_dir(path: str | Path) -> Path | None:
    """The encoder directory (``encoder.json`` inside) that ``path`` names: itself, a run's
    ``final/``, or a training checkpoint's ``model/``."""
    p = Path(path)
    return next((c for c in (p, p / "final", p / "model") if (c / "encoder.json").is_file()), None)


def eval_encoder(target, overrides: list[str] | None = None, sources: list[str] | None = None,
                 batch_size: int = 64, checkpoint: str | Path | None = None) -> dict:
    """Task metrics of a trained encoder.

    ``target``: a run's ``final/`` directory or a checkpoint's ``model/`` directory (the recipe is
    read from beside it), or a recipe (object, name or YAML path: its ``train.output_dir/final``).
    ``sources``: evaluation data paths replacing the recipe's ``data.eval_sources``.
    ``checkpoint``: the model to evaluate instead of the recipe's (a ``final/`` directory, a
    training checkpoint ``step-N/`` or its ``model/``), with the recipe's evaluation data.
    """
    model_dir = None
    if checkpoint is not None:
        model_dir = encoder_dir(checkpoint)
        if model_dir is None:
            raise ConfigError(f"--checkpoint {checkpoint}: no encoder.json in it, in its final/ or in its model/; "
                              "give a run's final/ directory or a checkpoint step-N/ directory")
    if isinstance(target, Recipe):
        recipe = target
    elif model_dir is None and Path(target).is_dir() and (Path(target) / "encoder.json").is_file():
        model_dir = Path(target)
        found = [p for p in (model_dir / "recipe.yaml", model_dir.parent / "recipe.yaml") if p.is_file()]
        if not found:
            raise ConfigError(f"no recipe.yaml in or beside '{model_dir}'")
        recipe = load_recipe(str(found[0]), overrides)
    else:
        recipe = load_recipe(str(target), overrides)
    _check(recipe)
    if model_dir is None:
        out = Path(recipe.train.output_dir)
        model_dir = out / "final"
        if not (model_dir / "encoder.json").is_file():
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                raise ConfigError(f"nothing to evaluate: no {out / 'final'} and no checkpoint in {out / 'checkpoints'}")
            model_dir = ckpt / "model"
    if sources:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
            update={"eval_sources": [SourceConfig(path=s) for s in sources]})})
    tok_dir = next((p for p in (model_dir / "tokenizer", model_dir.parent / "tokenizer") if p.is_dir()), None)
    if tok_dir is None:
        raise ConfigError(f"no tokenizer/ in or beside '{model_dir}'")
    module = load_encoder_module(model_dir)
    if torch.cuda.is_available():
        module.to("cuda")
    prep = prepare(recipe, tokenizer=load_tokenizer(tok_dir), train=False,
                   **({"label_names": module.spec.get("labels")} if recipe.objective == "classify" else {}))
    if not prep.eval_rows:
        raise ConfigError("no evaluation data: set data.eval_sources in the recipe or pass sources")
    return {**evaluate_prepared(module, prep, recipe, batch_size), "model_dir": str(model_dir)}
