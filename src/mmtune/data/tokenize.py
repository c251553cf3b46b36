"""Records -> training examples: templating, tokenization, length policy, eval split, cache.

:func:`build_datasets` is the data engine's entry point. An example is
``{"input_ids": list[int], "labels": list[int]}`` with labels aligned to the inputs (Hugging Face
convention, -100 = no loss) and ``labels[0] == -100`` always: the first token of a sample is never
predicted, alone or inside a packed row (where it would otherwise be predicted from the previous
sample's last token), so packed and unpacked losses are identical.

- Conversations go through the chat template (:mod:`mmtune.data.templates`) with ``loss_on``;
  the ``pretrain`` objective trains on every token of a conversation.
- Documents (``text`` format) get BOS (if the tokenizer has one) and EOS when ``add_eos``; every
  token but the first carries loss.
- Longer than ``max_length``: with ``truncation`` the sample is cut, and dropped (counted as
  ``truncated_no_supervised``) if nothing supervised is left; without it the sample is a bad
  record (reason ``too_long``). A sample with no supervised token is a bad record
  (``no_supervised_tokens``); it is never kept silently.

Tokenization runs in ``num_proc`` processes with a progress bar and is cached under ``cache_dir``
keyed by a hash of the records, the tokenizer, the template and the settings; a hit skips it.
The mixture (weights / repeats) is applied after tokenization, so each record is encoded once
and changing weights does not invalidate the cache.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, MMTuneError
from .sources import BadRecordStats, Record, load_source, mix, mixture_counts, split_eval
from .templates import IGNORE, ChatTemplate, get_template

CACHE_VERSION = 1  # bump when the encoding of examples changes
TRUNCATED_EMPTY = "truncated_no_supervised"


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the records, tokenizer and template that changes the examples."""

    max_length: int
    loss_on: str
    truncation: bool
    add_eos: bool
    reasoning: str = "rationale"  # rationale | final_answer | no_rationale (see DataConfig.reasoning)
    answer_marker: str = "Answer:"

    @classmethod
    def from_config(cls, data_cfg, loss_on: str) -> EncodeSettings:
        return cls(data_cfg.max_length, loss_on, data_cfg.truncation, data_cfg.add_eos,
                   data_cfg.reasoning, data_cfg.answer_marker)


@dataclass
class DataReport:
    """What the data engine did; ``lines()`` is printed before training."""

    template: str = ""
    records: int = 0  # training records read (after skipping bad ones and max_records)
    kept: int = 0  # distinct training examples after the length policy
    examples: int = 0  # training examples in one epoch of the mixture
    dropped: dict[str, int] = field(default_factory=dict)  # per reason: bad records + truncation drops
    truncated: int = 0  # kept examples that were cut to max_length
    tokens: int = 0  # tokens in one epoch of the mixture
    supervised_tokens: int = 0  # tokens with a label (labels != -100) in one epoch
    eval_records: int = 0
    eval_examples: int = 0
    eval_tokens: int = 0
    eval_supervised_tokens: int = 0
    max_length: int = 0
    longest: int = 0
    sources: list[str] = field(default_factory=list)  # one line per source
    bad_record_examples: list[str] = field(default_factory=list)  # first message per reason
    cache: str = "disabled"  # "hit <path>", "miss, wrote <path>", "disabled"

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def lines(self) -> list[str]:
        out = [f"data: template {self.template}, max_length {self.max_length}, cache {self.cache}"]
        out += [f"  source {s}" for s in self.sources]
        out.append(f"  train: {self.records} records -> {self.kept} examples kept, {self.examples} per epoch, "
                   f"{self.tokens} tokens ({self.supervised_tokens} supervised, "
                   f"{self.supervised_tokens / max(self.tokens, 1):.1%}), longest {self.longest}")
        if self.truncated:
            out.append(f"  truncated to max_length: {self.truncated}")
        if self.dropped:
            parts = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])))
            out.append(f"  dropped {self.dropped_total}: {parts}")
            out += [f"    e.g. {m}" for m in self.bad_record_examples]
        if self.eval_records:
            out.append(f"  eval: {self.eval_records} records -> {self.eval_examples} examples, {self.eval_tokens} "
                       f"tokens ({self.eval_supervised_tokens} supervised)")
        return out


# ---------------------------------------------------------------------------------------------
# Encoding one sample


def encode_sample(sample: dict, template: ChatTemplate, settings: EncodeSettings) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, truncated)`` of one normalised sample. Raises DataError (without a
    location) for too_long / no_supervised_tokens, and returns empty lists for a truncated sample
    left with nothing supervised."""
    tok = template.tokenizer
    if "messages" in sample:
        messages, marker = sample["messages"], None
        if settings.reasoning == "no_rationale":
            messages = drop_rationale(messages, settings.answer_marker)
        elif settings.reasoning == "final_answer":
            marker = settings.answer_marker
        ids, labels = template.encode(messages, settings.loss_on, answer_marker=marker)
    else:
        ids = list(tok(sample["text"], add_special_tokens=False)["input_ids"])
        if settings.add_eos:
            if getattr(tok, "bos_token_id", None) is not None:
                ids = [tok.bos_token_id, *ids]
            if getattr(tok, "eos_token_id", None) is not None:
                ids.append(tok.eos_token_id)
        labels = list(ids)
        if labels:
            labels[0] = IGNORE
    truncated = False
    if len(ids) > settings.max_length:
        if not settings.truncation:
            raise DataError(None, None, f"sample is {len(ids)} tokens, longer than data.max_length "
                            f"{settings.max_length}; raise max_length, set data.truncation: true, or shorten it",
                            "too_long")
        ids, labels, truncated = ids[: settings.max_length], labels[: settings.max_length], True
    if not any(x != IGNORE for x in labels):
        if truncated:
            return [], [], True
        raise DataError(None, None, "sample has no supervised token (nothing to learn from)", "no_supervised_tokens")
    return ids, labels, truncated


def drop_rationale(messages: list[dict], marker: str) -> list[dict]:
    """Assistant turns containing ``marker`` cut to the text after its last occurrence: a
    chain-of-thought answer "... Answer: 36" becomes "36" (the model learns to answer directly)."""
    out = []
    for m in messages:
        content = m.get("content")
        if m["role"] == "assistant" and isinstance(content, str) and marker in content:
            m = {**m, "content": content.rsplit(marker, 1)[1].strip()}
        out.append(m)
    return out


# Worker state for multiprocessing: the template (holding the tokenizer) is sent once per process.
_WORKER: dict = {}


def _init_worker(template: ChatTemplate, settings: EncodeSettings) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["template"], _WORKER["settings"] = template, settings


def _encode_one(sample: dict, template: ChatTemplate, settings: EncodeSettings) -> tuple:
    try:
        ids, labels, truncated = encode_sample(sample, template, settings)
    except DataError as e:
        return ("bad", e.reason, e.problem, e.field)
    if not ids:
        return ("drop", TRUNCATED_EMPTY)
    return ("ok", ids, labels, truncated)


def _worker_context():
    """Where ``fork`` exists (Linux), fork: the workers start in milliseconds with the tokenizer
    already loaded (spawn re-imports transformers in each, ~3 s: slower than one process on a few
    thousand records). The tokenizers library disables its own thread pool in a forked child, and
    ``TOKENIZERS_PARALLELISM=false`` says so up front; the workers only tokenize (no torch
    threads). Elsewhere spawn."""
    if "fork" in mp.get_all_start_methods():
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _encode_chunk(samples: list[dict]) -> list[tuple]:
    return [_encode_one(s, _WORKER["template"], _WORKER["settings"]) for s in samples]


def _encode_all(samples: list[dict], template: ChatTemplate, settings: EncodeSettings, num_proc: int,
                progress: bool) -> list[tuple]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(samples), desc="tokenizing", unit="rec", disable=not progress, leave=False)
    try:
        if num_proc <= 1 or len(samples) < 2 * num_proc:
            out = []
            for s in samples:
                out.append(_encode_one(s, template, settings))
                bar.update(1)
            return out
        size = max(1, min(1000, len(samples) // (num_proc * 8)))
        chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
        out = []
        with _worker_context().Pool(num_proc, initializer=_init_worker, initargs=(template, settings)) as pool:
            for res in pool.imap(_encode_chunk, chunks):
                out += res
                bar.update(len(res))
        return out
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Cache


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps(specials).encode())
    return h.hexdigest()


def cache_key(groups: list[list[Record]], eval_records: list[Record], tokenizer, template: ChatTemplate,
              settings: EncodeSettings, on_bad_record: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, asdict(settings), on_bad_record, template.fingerprint(),
                         tokenizer_fingerprint(tokenizer)]).encode())
    for gi, group in enumerate([*groups, eval_records]):
        h.update(f"\x00group{gi}\x00".encode())
        for r in group:
            h.update(json.dumps(r.sample, sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()[:32]


def _save_cache(path: Path, examples: list[list[dict]], meta: dict) -> None:
    """``examples[g]`` for each group g (train sources..., eval) as flat int32 arrays + offsets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [ex for g in examples for ex in g]
    lengths = np.array([len(ex["input_ids"]) for ex in flat], dtype=np.int64)
    arrays = {
        "group_sizes": np.array([len(g) for g in examples], dtype=np.int64),
        "lengths": lengths,
        "input_ids": np.fromiter((t for ex in flat for t in ex["input_ids"]), dtype=np.int32, count=int(lengths.sum())),
        "labels": np.fromiter((t for ex in flat for t in ex["labels"]), dtype=np.int32, count=int(lengths.sum())),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path.with_suffix(".npz"))
    tmpj = path.with_suffix(f".tmp{os.getpid()}.json")
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, path.with_suffix(".json"))


def _load_cache(path: Path) -> tuple[list[list[dict]], dict] | None:
    npz, js = path.with_suffix(".npz"), path.with_suffix(".json")
    if not (npz.exists() and js.exists()):
        return None
    try:
        meta = json.loads(js.read_text())
        with np.load(npz) as z:
            sizes, lengths = z["group_sizes"].tolist(), z["lengths"]
            ids, labels = z["input_ids"].tolist(), z["labels"].tolist()
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is rebuilt
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    flat = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(starts, ends)]
    groups, k = [], 0
    for n in sizes:
        groups.append(flat[k:k + n])
        k += n
    return groups, meta


# ---------------------------------------------------------------------------------------------
# Entry point


def effective_loss_on(objective, loss_on: str) -> str:
    """``loss_on`` for ``objective`` (a name or an Objective): ``pretrain`` trains on every token."""
    name = objective if isinstance(objective, str) else getattr(objective, "name", "sft")
    return "all" if name == "pretrain" else loss_on


def build_datasets(data_cfg, tokenizer, objective="sft", seed: int = 0, *, progress: bool = True):
    """Load, template, tokenize and mix the data of a recipe.

    Args:
        data_cfg: a :class:`mmtune.config.DataConfig`.
        tokenizer: a Hugging Face tokenizer (fast tokenizers give exact template parity).
        objective: objective name or object; ``pretrain`` puts loss on every token of conversations.
        seed: seeds the mixture sampling, the shuffle and the eval split.
        progress: show a tqdm bar while tokenizing.

    Returns:
        ``(train_examples, eval_examples, report)``: lists of ``{"input_ids", "labels"}`` dicts
        (train shuffled, one epoch of the mixture) and a :class:`DataReport`.
    """
    if not data_cfg.sources:
        raise ConfigError("data.sources is empty: add at least one source (a file path or builtin:NAME)")
    mixture_counts([1] * len(data_cfg.sources), data_cfg.sources)  # weight/repeat conflicts fail before any work
    template = get_template(data_cfg.template, tokenizer, system_prompt=data_cfg.system_prompt)
    loss_on = effective_loss_on(objective, data_cfg.loss_on)
    settings = EncodeSettings.from_config(data_cfg, loss_on)
    policy = data_cfg.on_bad_record
    stats = BadRecordStats()

    groups = [load_source(s, on_bad_record=policy, stats=stats, seed=seed) for s in data_cfg.sources]
    read = [len(g) for g in groups]
    if data_cfg.eval_sources:
        eval_records = [r for s in data_cfg.eval_sources
                        for r in load_source(s, on_bad_record=policy, stats=stats, seed=seed)]
    else:
        eval_records = []
        if data_cfg.eval_fraction > 0:
            for i, g in enumerate(groups):
                groups[i], held = split_eval(g, data_cfg.eval_fraction, seed, salt=str(i))
                eval_records += held

    all_groups = [*groups, eval_records]
    key = cache_key(groups, eval_records, tokenizer, template, settings, policy)
    cache_path = Path(data_cfg.cache_dir) / "tokenized" / key if data_cfg.cache_dir else None
    cached = _load_cache(cache_path) if cache_path is not None else None
    if cached is not None:
        examples, meta = cached
        cache_state = f"hit {cache_path}.npz"
    else:
        examples, meta = _encode_groups(all_groups, template, settings, policy, data_cfg.num_proc, progress)
        cache_state = "disabled"
        if cache_path is not None:
            _save_cache(cache_path, examples, meta)
            cache_state = f"miss, wrote {cache_path}.npz"

    encode_stats = BadRecordStats(Counter(meta["bad"]), dict(meta["bad_first"]))
    stats.merge(encode_stats)
    train_groups, eval_examples = examples[:-1], examples[-1]
    train = mix(train_groups, data_cfg.sources, seed)

    dropped = dict(stats.counts)
    if meta["truncated_empty"]:
        dropped[TRUNCATED_EMPTY] = meta["truncated_empty"]
    report = DataReport(
        template=template.name, records=sum(len(g) for g in groups),
        kept=sum(len(g) for g in train_groups), examples=len(train), dropped=dropped, truncated=meta["truncated"],
        tokens=sum(len(e["input_ids"]) for e in train),
        supervised_tokens=sum(sum(1 for x in e["labels"] if x != IGNORE) for e in train),
        eval_records=len(eval_records), eval_examples=len(eval_examples),
        eval_tokens=sum(len(e["input_ids"]) for e in eval_examples),
        eval_supervised_tokens=sum(sum(1 for x in e["labels"] if x != IGNORE) for e in eval_examples),
        max_length=data_cfg.max_length, longest=max((len(e["input_ids"]) for e in train), default=0),
        bad_record_examples=stats.examples(), cache=cache_state,
        sources=[_source_line(s, n, len(g), used) for s, n, g, used in
                 zip(data_cfg.sources, read, train_groups, mixture_counts([len(g) for g in train_groups],
                                                                            data_cfg.sources))],
    )
    if not train:
        raise MMTuneError("no training examples left after dropping bad and overlong records: "
                          + "; ".join(line.strip() for line in report.lines()[1:]))
    return train, eval_examples, report


def _source_line(src, read: int, kept: int, used: int) -> str:
    how = f"weight {src.weight:g}" if src.weight is not None else f"repeat {src.repeat:g}"
    return f"{src.path}: {read} records, {kept} examples, {used} per epoch ({how})"


def _encode_groups(groups: list[list[Record]], template: ChatTemplate, settings: EncodeSettings, policy: str,
                   num_proc: int, progress: bool) -> tuple[list[list[dict]], dict]:
    flat = [r for g in groups for r in g]
    results = _encode_all([r.sample for r in flat], template, settings, num_proc, progress)
    stats = BadRecordStats()
    truncated = truncated_empty = 0
    out: list[list[dict]] = []
    k = 0
    for g in groups:
        kept = []
        for rec in g:
            res = results[k]
            k += 1
            if res[0] == "ok":
                kept.append({"input_ids": res[1], "labels": res[2]})
                truncated += res[3]
            elif res[0] == "drop":
                truncated_empty += 1
            else:
                err = DataError(rec.path, rec.line, res[2], res[1], res[3])
                if policy == "error":
                    raise err
                stats.add(err)
        out.append(kept)
    meta = {"bad": dict(stats.counts), "bad_first": stats.first, "truncated": truncated,
            "truncated_empty": truncated_empty}
    return out, meta
