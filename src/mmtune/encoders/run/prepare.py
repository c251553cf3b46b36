"""Data of an encoder run: the tokenizer (the checkpoint's, the recipe's, the model's, or one trained
on the corpus), pretraining rows (segments or sentence pairs, masks drawn statically or per batch)
or downstream rows (classification, QA windows, similarity pairs), and the held-out split."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ...config import Recipe, SourceConfig
from ...errors import ConfigError
from .. import downstream
from ..config import EncoderConfig
from ..corpus import CorpusReport, limit_records, read_documents, read_json_records
from ..masking import MLMCollator, static_generator
from ..models import model_type_of, resolve_model_path
from ..pairs import segment_pairs, single_segments
from ..tasks import BUILTIN_TASKS, builtin_task
from ..tokenizer import Layout, load_tokenizer, non_special_ids, tokenize_sentences, train_tokenizer

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
