"""Run an encoder recipe end to end: data, tokenizer, model, the shared training loop, evaluation.

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

import copy
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import Recipe, SourceConfig, load_recipe
from ..errors import ConfigError
from ..train.checkpoint import latest_checkpoint
from ..train.loop import Trainer
from . import ENCODER_OBJECTIVES, downstream
from .config import EncoderConfig
from .corpus import CorpusReport, limit_records, read_documents, read_json_records
from .masking import MLMCollator, static_generator
from .models import (
    EncoderModule,
    PretrainingHeads,
    apply_adapter,
    load_encoder_module,
    load_hf_model,
    model_type_of,
    new_modules,
    quiet_transformers,
    resolve_model_path,
    trainable_summary,
)
from .objectives import EncoderObjective, build_objective
from .pairs import segment_pairs, single_segments
from .tasks import BUILTIN_TASKS, builtin_task
from .tokenizer import Layout, load_tokenizer, non_special_ids, tokenize_sentences, train_tokenizer

PRETRAIN_OBJECTIVES = ("mlm", "mlm_nsp", "mlm_sop", "electra")
TASK_OF = {"classify": "classify", "qa": "qa", "similarity_cross": "similarity", "similarity_bi": "similarity"}


@dataclass
class Prepared:
    """Everything a run or an evaluation needs besides the model."""

    kind: str  # an objective name
    tokenizer: object
    collate: object
    train_rows: list = field(default_factory=list)
    eval_rows: list = field(default_factory=list)
    eval_examples: list = field(default_factory=list)  # QA: the examples the eval windows come from
    label_names: list = field(default_factory=list)
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Data


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0:
        return items, []
    idx = list(range(len(items)))
    random.Random(f"eval-split-{seed}").shuffle(idx)
    k = max(1, int(round(fraction * len(items))))
    held = set(idx[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _task_records(sources: list[SourceConfig], objective: str) -> list[tuple[str, int | None, dict]]:
    """(file, line, record) of every downstream record of ``sources``."""
    out = []
    for src in sources:
        if src.path.startswith("builtin:"):
            name = src.path.split(":", 1)[1]
            if name in BUILTIN_TASKS and BUILTIN_TASKS[name][0] != TASK_OF[objective]:
                raise ConfigError(f"data source '{src.path}' is a {BUILTIN_TASKS[name][0]} task; objective "
                                  f"'{objective}' needs a {TASK_OF[objective]} task")
            recs = [(src.path, i + 1, r) for i, r in enumerate(builtin_task(name))]
        else:
            path = Path(src.path)
            if not path.is_file():
                raise ConfigError(f"data source '{src.path}': no such file")
            if path.suffix not in (".jsonl", ".json"):
                raise ConfigError(f"data source '{src.path}': downstream encoder data are .jsonl or .json files")
            recs = [(str(path), line, r) for line, r in read_json_records(path)]
        out.extend(limit_records(recs, src))
    return out


def _tokenizer_texts(objective: str, records) -> list[str]:
    texts = []
    for _, _, r in records:
        if objective == "classify":
            texts += [r.get("text", ""), r.get("text_pair") or ""]
        elif objective == "qa":
            texts += [r.get("question", ""), r.get("context", "")]
        else:
            texts += [r.get("sentence1", ""), r.get("sentence2", "")]
    return [t for t in texts if isinstance(t, str) and t]


def resolve_tokenizer(recipe: Recipe, enc: EncoderConfig, texts, resume_dir: Path | None = None):
    """The checkpoint's tokenizer on resume; else ``encoder.tokenizer``; else the model directory's;
    else one trained on ``texts()`` (a built-in model)."""
    if resume_dir is not None and (resume_dir / "tokenizer").is_dir():
        return load_tokenizer(resume_dir / "tokenizer")
    if enc.tokenizer:
        return load_tokenizer(enc.tokenizer)
    kind, where = resolve_model_path(recipe.model.path)
    if kind == "dir":
        return load_tokenizer(where)
    tk_type = enc.tokenizer_type
    if tk_type == "auto":
        tk_type = "bpe" if model_type_of(recipe.model.path) == "roberta" else "wordpiece"
    return train_tokenizer(texts(), tk_type, enc.vocab_size, enc.lowercase)


def _pretraining_rows(docs, tokenizer, recipe: Recipe, enc: EncoderConfig, report: CorpusReport, seed: int,
                      collator: MLMCollator, static: bool, copies: int) -> list[dict]:
    flat = [s for d in docs for s in d]
    tokenized = tokenize_sentences(tokenizer, flat)
    tdocs, k = [], 0
    for d in docs:
        tdocs.append(tokenized[k:k + len(d)])
        k += len(d)
    layout = Layout.of(tokenizer)
    max_len = recipe.data.max_length
    objective = recipe.objective
    if objective in ("mlm_nsp", "mlm_sop"):
        rows = segment_pairs(tdocs, layout, max_len, objective.split("_")[1], seed, report, enc.pair_probability)
    else:
        rows = single_segments(tdocs, layout, max_len, report)
    if not static:
        return rows
    out = []
    for c in range(copies):
        for r in rows:
            masked = collator.mask_row(r, static_generator(seed, r["id"], c))
            masked["id"] = c * len(rows) + r["id"]
            out.append(masked)
    return out


def prepare_pretraining(recipe: Recipe, enc: EncoderConfig, tokenizer=None, resume_dir: Path | None = None,
                        train: bool = True) -> Prepared:
    seed = recipe.train.seed
    report = CorpusReport()
    need_train_docs = train or (not recipe.data.eval_sources and recipe.data.eval_fraction > 0)
    docs, _ = read_documents(recipe.data.sources, enc.corpus_format, report) if need_train_docs else ([], report)
    if recipe.data.eval_sources:
        eval_docs, _ = read_documents(recipe.data.eval_sources, enc.corpus_format, CorpusReport())
    else:
        docs, eval_docs = _split(docs, recipe.data.eval_fraction, seed)
    if tokenizer is None:
        tokenizer = resolve_tokenizer(recipe, enc, lambda: [" ".join(d) for d in docs], resume_dir)
    collator = MLMCollator(pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id,
                           random_ids=non_special_ids(tokenizer), mlm_probability=enc.mlm_probability,
                           mask_fraction=enc.mask_token_fraction, random_fraction=enc.random_token_fraction,
                           whole_word=enc.whole_word_mask)
    train_rows = (_pretraining_rows(docs, tokenizer, recipe, enc, report, seed, collator,
                                    enc.masking == "static", enc.mask_copies) if train else [])
    eval_rows = []
    if eval_docs:
        # Eval masks are fixed (drawn from seed + 1) so eval losses compare across steps and runs.
        eval_rows = _pretraining_rows(eval_docs, tokenizer, recipe, enc, CorpusReport(), seed + 1, collator,
                                      True, 1)
    return Prepared(recipe.objective, tokenizer, collator, train_rows, eval_rows, report=report.as_dict())


def _downstream_rows(objective: str, records, tokenizer, recipe: Recipe, enc: EncoderConfig,
                     label_names: list[str], text_field: str) -> tuple[list[dict], list[dict]]:
    max_len = recipe.data.max_length
    if objective == "classify":
        return downstream.classification_rows(tokenizer, records, max_len, label_names, text_field), []
    if objective == "qa":
        examples = downstream.qa_examples(records)
        return downstream.qa_features(tokenizer, examples, max_len, enc.doc_stride), examples
    return downstream.similarity_rows(tokenizer, records, max_len, enc.score_range,
                                      bi=objective == "similarity_bi"), []


def prepare_downstream(recipe: Recipe, enc: EncoderConfig, tokenizer=None, resume_dir: Path | None = None,
                       label_names: list[str] | None = None, train: bool = True) -> Prepared:
    objective = recipe.objective
    need_train = train or (not recipe.data.eval_sources and recipe.data.eval_fraction > 0)
    records = _task_records(recipe.data.sources, objective) if need_train else []
    if recipe.data.eval_sources:
        eval_records = _task_records(recipe.data.eval_sources, objective)
    else:
        records, eval_records = _split(records, recipe.data.eval_fraction, recipe.train.seed)
    if tokenizer is None:
        tokenizer = resolve_tokenizer(recipe, enc, lambda: _tokenizer_texts(objective, records), resume_dir)
    text_field = recipe.data.sources[0].text_field if recipe.data.sources else "text"
    if objective == "classify" and label_names is None:
        label_names = sorted({str(r.get("label")) for _, _, r in records})
        if len(label_names) < 2:
            raise ConfigError(f"classification needs at least two labels in the training data, found {label_names}")
    train_rows, _ = (_downstream_rows(objective, records, tokenizer, recipe, enc, label_names or [], text_field)
                     if train else ([], []))
    eval_rows, eval_examples = ([], [])
    if eval_records:
        eval_rows, eval_examples = _downstream_rows(objective, eval_records, tokenizer, recipe, enc,
                                                    label_names or [], text_field)
    report = {"train_records": len(records), "train_rows": len(train_rows), "eval_records": len(eval_records),
              "eval_rows": len(eval_rows)}
    if train and not train_rows:
        raise ConfigError(f"no training records for objective '{objective}' in data.sources")
    collate = downstream.PadCollator(tokenizer.pad_token_id, downstream.COLLATE_SCALARS[objective])
    return Prepared(objective, tokenizer, collate, train_rows, eval_rows, eval_examples, label_names or [], report)


def prepare(recipe: Recipe, tokenizer=None, resume_dir: Path | None = None, **kw) -> Prepared:
    enc = recipe.encoder or EncoderConfig()
    if recipe.objective in PRETRAIN_OBJECTIVES:
        return prepare_pretraining(recipe, enc, tokenizer, resume_dir, **kw)
    return prepare_downstream(recipe, enc, tokenizer, resume_dir, **kw)


# ---------------------------------------------------------------------------------------------
# Model


def _new_weight_patterns(missing: list[str]) -> list[str]:
    return [f"*{k}" for k in missing]


def build_encoder_module(recipe: Recipe, prep: Prepared) -> EncoderModule:
    """The network for the recipe's objective with pretrained weights where the model has them."""
    enc = recipe.encoder or EncoderConfig()
    objective, tok = recipe.objective, prep.tokenizer
    from_scratch = resolve_model_path(recipe.model.path)[0] == "builtin"
    adapter = recipe.adapter.model_dump(mode="json")
    base = {"adapter": adapter, "freeze": list(recipe.model.freeze), "objective": objective,
            "base_model": recipe.model.path}
    max_len = recipe.data.max_length
    if objective == "electra":
        from transformers import ElectraForMaskedLM

        from .electra import ElectraPretrainer, generator_config

        if recipe.adapter.type != "none":
            raise ConfigError("objective electra trains generator and discriminator in full; set adapter.type: none")
        disc, _ = load_hf_model(recipe.model, "disc", tok, max_len, enc)
        gen_dir = _generator_dir(recipe.model.path)
        if gen_dir is not None:
            with quiet_transformers():
                gen = ElectraForMaskedLM.from_pretrained(str(gen_dir))
        else:
            gen = ElectraForMaskedLM(generator_config(disc.config, enc.generator_size))
        special = sorted(set(tok.all_special_ids))
        net = ElectraPretrainer(gen, disc, special)
        spec = {"kind": "electra", **base, "special_ids": special,
                "configs": {"generator": gen.config.to_dict(), "discriminator": disc.config.to_dict()}}
        module = EncoderModule(net, spec)
    elif objective in PRETRAIN_OBJECTIVES:
        hf, missing = load_hf_model(recipe.model, "pair" if objective != "mlm" else "mlm", tok, max_len, enc)
        spec = {"kind": "pretrain", **base, "hf_class": type(hf).__name__, "configs": {"model": hf.config.to_dict()},
                "always_train": _new_weight_patterns(missing), "new_weights": missing}
        net = apply_adapter(hf, recipe.adapter, lora_attr=None, always_train=spec["always_train"],
                            freeze=recipe.model.freeze, from_scratch=from_scratch, new_modules=new_modules(missing))
        module = EncoderModule(PretrainingHeads(net), spec)
    else:
        backbone, missing = load_hf_model(recipe.model, "base", tok, max_len, enc)
        kind = objective
        spec = {"kind": kind, **base, "backbone_class": type(backbone).__name__,
                "configs": {"backbone": backbone.config.to_dict()}, "pooling": enc.pooling,
                "dropout": enc.classifier_dropout, "num_labels": len(prep.label_names) if kind == "classify" else 1,
                "labels": prep.label_names,
                "always_train": downstream.HEAD_PARAMS[kind] + [f"backbone.*{k}" for k in missing],
                "new_weights": missing}
        net = apply_adapter(downstream.make_net(kind, backbone, spec), recipe.adapter, lora_attr="backbone",
                            always_train=spec["always_train"], freeze=recipe.model.freeze, from_scratch=from_scratch,
                            new_modules=new_modules(missing))
        module = EncoderModule(net, spec)
    if recipe.model.gradient_checkpointing:
        for m in module.modules():
            if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
                m.gradient_checkpointing_enable()
    return module


def _generator_dir(model_path: str) -> Path | None:
    kind, where = resolve_model_path(model_path)
    if kind == "dir" and Path(where).name == "hf" and (Path(where).parent / "hf-generator").is_dir():
        return Path(where).parent / "hf-generator"
    return None


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_pretraining(module, rows: list[dict], collate, objective: EncoderObjective, batch_size: int = 32,
                         seed: int = 0) -> dict:
    """Exact aggregates of the objective's parts (mlm_loss, mlm_acc, pair_acc, rtd_acc, ...) over ``rows``."""
    module.eval()
    device = next(module.parameters()).device
    torch.manual_seed(seed)  # ELECTRA samples replacements from the global generator
    sums: dict[str, list[float]] = {}
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
        _, _, _, parts = objective.parts(module, batch)
        for k, (s, n) in parts.items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    out = {k: s / max(n, 1.0) for k, (s, n) in sums.items()}
    if "mlm_loss" in out:
        out["mlm_perplexity"] = math.exp(min(out["mlm_loss"], 50.0))
    out["n"] = len(rows)
    return out


def evaluate_prepared(module, prep: Prepared, recipe: Recipe, batch_size: int = 64) -> dict:
    if not prep.eval_rows:
        return {}
    enc = recipe.encoder or EncoderConfig()
    if recipe.objective in PRETRAIN_OBJECTIVES:
        return evaluate_pretraining(module, prep.eval_rows, prep.collate, build_objective(recipe.objective, enc),
                                    batch_size, recipe.train.seed)
    return downstream.evaluate(module, prep.eval_rows, prep.collate, recipe.objective, examples=prep.eval_examples,
                               max_answer_tokens=enc.max_answer_tokens, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# Export


def _merged(net):
    """A copy of ``net`` with LoRA merged into the base weights (``net`` itself if no LoRA)."""
    if hasattr(net, "merge_and_unload"):
        return copy.deepcopy(net).merge_and_unload()
    return net


def export_final(module: EncoderModule, tokenizer, recipe: Recipe, out: Path, metrics: dict | None = None) -> Path:
    """Write ``out`` (see the module docstring): the mmtune encoder directory plus ``hf/``."""
    out = Path(out)
    module.save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(metrics or {}, indent=1, default=str))
    net = module.net
    kind = module.spec["kind"]
    if kind == "electra":
        pairs = [(net.discriminator, out / "hf"), (net.generator, out / "hf-generator")]
    elif kind == "pretrain":
        pairs = [(_merged(net.model), out / "hf")]
    else:
        pairs = [(_merged(net.backbone), out / "hf")]
    with quiet_transformers():
        for model, where in pairs:
            model.save_pretrained(str(where))
            tokenizer.save_pretrained(str(where))
    return out


# ---------------------------------------------------------------------------------------------
# Entry points


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
