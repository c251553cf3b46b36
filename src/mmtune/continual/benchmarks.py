"""Built-in task sequences (no downloads) and what the runner needs from each.

A :class:`Benchmark` turns the ``continual`` section into per-task training and evaluation
examples, builds the model and the objective, collates batches, and scores a model on a task.

- :class:`DigitsBenchmark`, Split-Digits on scikit-learn's bundled 8x8 digits (1797 images,
  ``sklearn.datasets.load_digits``), split once into train/test (stratified, ``split_seed``):

  - class-incremental (``scenario: class``): tasks ``digits:0,1``, ``digits:2,3``, ... one
    10-way head, no task id at test (Split-MNIST protocol of van de Ven & Tolias 2019, "Three
    scenarios for continual learning");
  - task-incremental (``scenario: task``): the same tasks, the task id given at test: logits
    outside the task's classes are masked (multi-head) at training and test;
  - domain-incremental (``scenario: domain``): tasks ``digits-permuted:S``, all ten classes
    with the 64 pixels permuted by a fixed permutation per task (Permuted-MNIST, Goodfellow et
    al. 2013), ``S = 0`` the identity.

- :class:`TextBenchmark`, a sequence of generative instruction tasks for the recipe's language
  model (``builtin:add`` -> ``builtin:reverse`` -> ``builtin:capital``, or JSON/JSONL files),
  rendered with the recipe's chat template, loss on the answers, scored by exact match of the
  greedy answer (:func:`mmtune.evaluation.greedy_answers`).
"""

from __future__ import annotations

import abc
import functools
import random
from collections.abc import Hashable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..config import SourceConfig
from ..data.builtin import corpus
from ..data.formats import detect_format, normalize
from ..data.packing import collate_padded
from ..data.sources import load_source
from ..data.templates import get_template
from ..errors import ConfigError
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..train.objectives import Objective
from ..train.scoring import greedy_answers, normalize_answer
from .config import ContinualConfig, TaskConfig
from .general import PROBE_SETS, general_records, key_hit
from .nets import build_digits_net
from .objectives import ClassifierObjective, ContinualLMObjective, apply_head_mask
from .strategies.base import TaskInfo, eval_mode

NUM_DIGITS = 10


@dataclass
class TaskData:
    info: TaskInfo
    train: list
    eval: list
    metric: str
    #: share of the evaluation items that are also training items (1.0: the task is scored on what
    #: it memorised, not on held-out items)
    eval_overlap: float = 0.0
    #: evaluation items made of training items (``seen_eval_size``): the memorisation matrix
    seen: list | None = None


class Benchmark(abc.ABC):
    """What the continual runner needs from a task sequence."""

    scenario: str
    tasks: list[TaskData]
    modalities: tuple[str, ...] = ()

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh model (the same one for the same global seed)."""

    @abc.abstractmethod
    def objective(self, features: bool = False) -> Objective:
        """The training objective; its outputs are a :class:`~mmtune.continual.objectives.Forward`."""

    @abc.abstractmethod
    def collate(self, rows: list) -> dict:
        """Examples (train, eval, memory or reference rows; extra keys ignored) -> a batch."""

    @abc.abstractmethod
    def evaluate(self, model, task: TaskData, batch_size: int) -> float:
        """The task's metric, in [0, 1], for ``model`` as it is now."""

    def kd_groups(self, tasks: list[TaskInfo]) -> list[list[int]] | None:
        """Output units of ``tasks`` to distil over, one softmax per group (None: all units)."""
        return None

    def label(self, row: dict) -> Hashable:
        """The class of an example for class-balanced memories."""
        return row["task"]

    def reference_rows(self, n: int, seed: int) -> list:
        """Examples from outside the tasks (ZSCL's reference data)."""
        raise ConfigError(f"{type(self).__name__} has no reference data")

    def probe_names(self) -> list[str]:
        """Names of the probes (``continual.probes``): evaluated, never trained."""
        return []

    def evaluate_probes(self, model) -> list[float]:
        """Every probe's value for ``model`` as it is now (:mod:`mmtune.continual.general`)."""
        return []

    def before_task(self, model, task: TaskInfo) -> None:
        """Called after the strategy's ``before_task``: what the benchmark's model must train for
        ``task`` besides what the strategy chose (the multimodal benchmark's encoders)."""
        return None

    @property
    def lora_defaults(self) -> dict:
        return {}

    @property
    def fwt_defined(self) -> bool:
        """False where R[j-1][j] cannot measure transfer (class-incremental: unseen classes)."""
        return self.scenario != "class"

    def _check_modalities(self, cfg: TaskConfig, i: int) -> None:
        wrong = [m for m in (cfg.modalities or []) if m not in self.modalities]
        if wrong:
            raise ConfigError(f"continual.tasks.{i}.modalities: {', '.join(wrong)} not supported by this benchmark "
                              f"(its model takes {', '.join(self.modalities)})")


def _task_id(cfg: TaskConfig, i: int) -> int:
    return cfg.task_id if cfg.task_id is not None else i


def _take(rows: list, n: int | None, seed: str) -> list:
    if n is None or n >= len(rows):
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


# ---------------------------------------------------------------------------------------------
# Split-Digits


def parse_digits_source(src: str, where: str) -> tuple[list[int], int | None]:
    """``digits:C1,C2,..`` -> (classes, None); ``digits-permuted:SEED`` -> (all classes, SEED)."""
    try:
        if src.startswith("digits-permuted:"):
            return list(range(NUM_DIGITS)), int(src.split(":", 1)[1])
        classes = [int(c) for c in src.split(":", 1)[1].split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{where} = {src!r}: expected digits:C1,C2,... or digits-permuted:SEED (integers)") from None
    bad = [c for c in classes if not 0 <= c < NUM_DIGITS]
    if not classes or bad:
        raise ConfigError(f"{where} = {src!r}: classes must be digits 0-9 (got {classes})")
    return sorted(set(classes)), None


def pixel_permutation(seed: int, n: int = 64) -> torch.Tensor:
    """A fixed permutation of the n pixels; seed 0 is the identity."""
    if seed == 0:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=4)
def _digits_split(test_fraction: float, split_seed: int) -> dict:
    """scikit-learn's digits as float pixels in [0, 1], split stratified into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)  # pixel intensities 0..16 -> [0, 1]
    y = torch.tensor(y, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y.numpy(), random_state=split_seed)
    return {"train": (X[tr], y[tr]), "test": (X[te], y[te])}


class DigitsBenchmark(Benchmark):
    modalities = ("image",)

    def __init__(self, cc: ContinualConfig):
        self.cc, self.scenario = cc, cc.scenario
        self.split = _digits_split(cc.test_fraction, cc.split_seed)
        self.class_mask: dict[int, torch.Tensor] = {}
        self.tasks = []
        for i, t in enumerate(cc.tasks):
            self._check_modalities(t, i)
            tid = _task_id(t, i)
            classes, perm = parse_digits_source(t.source, f"continual.tasks.{i}.source")
            ev_classes, ev_perm = (classes, perm) if t.eval_source is None else \
                parse_digits_source(t.eval_source, f"continual.tasks.{i}.eval_source")
            mask = torch.zeros(NUM_DIGITS, dtype=torch.bool)
            mask[classes] = True
            self.class_mask[tid] = self.class_mask.get(tid, torch.zeros_like(mask)) | mask
            train = _take(self._rows("train", classes, perm, tid), t.train_size, f"train-{i}-{cc.split_seed}")
            ev = _take(self._rows("test", ev_classes, ev_perm, tid), t.eval_size, f"eval-{i}-{cc.split_seed}")
            self.tasks.append(TaskData(TaskInfo(i, t.name, tid, classes), train, ev, t.metric or "accuracy"))
            if (t.metric or "accuracy") != "accuracy":
                raise ConfigError(f"continual.tasks.{i}.metric: digits tasks are scored by accuracy")

    def _rows(self, split: str, classes: list[int], perm: int | None, tid: int) -> list[dict]:
        X, y = self.split[split]
        keep = torch.isin(y, torch.tensor(classes))
        Xs, ys = X[keep], y[keep]
        if perm is not None:
            Xs = Xs[:, pixel_permutation(perm)]  # (N, 64) columns permuted
        return [{"x": Xs[i], "y": int(ys[i]), "task": tid} for i in range(len(ys))]

    def build_model(self) -> torch.nn.Module:
        n = self.cc.digits_net
        return build_digits_net(n.arch, n.hidden, n.depth, n.heads, NUM_DIGITS)

    def objective(self, features: bool = False) -> Objective:
        return ClassifierObjective()

    def collate(self, rows: list) -> dict:
        batch = {"x": torch.stack([r["x"] for r in rows]),  # (B, 64)
                 "y": torch.tensor([r["y"] for r in rows], dtype=torch.long),
                 "task": torch.tensor([r["task"] for r in rows], dtype=torch.long)}
        if self.scenario == "task":
            every = torch.ones(NUM_DIGITS, dtype=torch.bool)
            batch["mask"] = torch.stack([self.class_mask.get(r["task"], every) for r in rows])  # (B, 10)
        return batch

    @torch.no_grad()
    def evaluate(self, model, task: TaskData, batch_size: int) -> float:
        device = next(model.parameters()).device
        correct = 0
        with eval_mode(model):
            for i in range(0, len(task.eval), batch_size):
                b = self.collate(task.eval[i:i + batch_size])
                logits = model(b["x"].to(device)).logits.float()  # (B, 10)
                mask = b.get("mask")
                pred = apply_head_mask(logits, None if mask is None else mask.to(device)).argmax(-1)
                correct += int((pred.cpu() == b["y"]).sum())
        return correct / max(len(task.eval), 1)

    def kd_groups(self, tasks: list[TaskInfo]) -> list[list[int]] | None:
        if self.scenario == "class":
            cols = sorted({c for t in tasks for c in (t.classes or [])})
            return [cols] if cols else None
        if self.scenario == "task":
            return [t.classes for t in tasks if t.classes]
        return None

    def label(self, row: dict) -> Hashable:
        return row["y"]

    def reference_rows(self, n: int, seed: int) -> list:
        """Synthetic images that are no digit: sparse random strokes (each pixel on with probability
        0.3, intensity uniform in [0, 1]), about as dark as a digit (~30% of pixels are ink)."""
        g = torch.Generator().manual_seed(seed + 17)
        x = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.3)  # (n, 64)
        return [{"x": x[i], "y": 0, "task": -1} for i in range(n)]

    @property
    def lora_defaults(self) -> dict:
        targets = ["head"] + [f"fcs.{i}" for i in range(self.cc.digits_net.depth)]
        if self.cc.digits_net.arch == "transformer":
            targets = ["head", "patch", "linear1", "linear2"]
        return {"r": 8, "alpha": 16, "dropout": 0.0, "targets": targets, "task_type": None}


# ---------------------------------------------------------------------------------------------
# Text sequence


class TextBenchmark(Benchmark):
    """Generative instruction tasks on the recipe's causal LM, exact-match scored."""

    modalities = ("text",)

    def __init__(self, recipe, cc: ContinualConfig):

        if cc.scenario == "class":
            raise ConfigError("continual.scenario: the text benchmark is generative (open vocabulary); use `task` "
                              "(task id at test) or `domain`")
        self.recipe, self.cc, self.scenario = recipe, cc, cc.scenario
        self.model_dir = resolve_model_path(recipe.model.path)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.template = get_template(recipe.data.template, self.tokenizer, recipe.data.system_prompt)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self._collate = partial(collate_padded, pad_id=pad)
        self.tasks = []
        for i, t in enumerate(cc.tasks):
            self._check_modalities(t, i)
            if (t.metric or "exact_match") != "exact_match":
                raise ConfigError(f"continual.tasks.{i}.metric: text tasks are scored by exact_match")
            tid = _task_id(t, i)
            ev_src = t.eval_source or (f"{t.source}-eval" if t.source.startswith("builtin:") else None)
            if ev_src is None:
                raise ConfigError(f"continual.tasks.{i}.eval_source: required for file sources ({t.source})")
            samples = [r.sample for r in load_source(SourceConfig(path=t.source, max_records=t.train_size), seed=0)]
            train = [self._encode(x, tid, f"continual.tasks.{i}.source") for x in samples]
            ev = [self._eval_item(r.sample, tid) for r in
                  load_source(SourceConfig(path=ev_src, max_records=t.eval_size), seed=0)]
            seen = {_prompt_key(x["messages"][:-1]) for x in samples}
            overlap = sum(_prompt_key(e["prompt"]) in seen for e in ev) / max(len(ev), 1)
            seen_items = [self._eval_item(x, tid) for x in samples[: t.seen_eval_size]] if t.seen_eval_size else None
            self.tasks.append(TaskData(TaskInfo(i, t.name, tid, None), train, ev, "exact_match", overlap, seen_items))
        self.probes = self._load_probes(cc)

    def _load_probes(self, cc: ContinualConfig) -> list[dict]:

        probes = []
        for i, p in enumerate(cc.probes):
            where = f"continual.probes.{i}"
            if p.source.startswith("general:"):
                if p.source not in PROBE_SETS:
                    raise ConfigError(f"{where}.source = {p.source!r}; built-in probe sets: {', '.join(PROBE_SETS)}")
                raw = general_records()[: p.size]
                samples = [{**normalize(r, detect_format(r)), "key": r["key"]} for r in raw]
                metric = p.metric or ("loss" if p.source == "general:chat" else "contains")
            elif Path(p.source).suffix in (".json", ".jsonl"):
                samples = [r.sample for r in load_source(SourceConfig(path=p.source, max_records=p.size), seed=0)]
                metric = p.metric or "exact_match"
            else:
                raise ConfigError(f"{where}.source = {p.source!r}: use general:chat, general:questions or a "
                                  ".json/.jsonl file")
            if metric == "contains" and not all(s.get("key") for s in samples):
                raise ConfigError(f"{where}: metric contains needs a `key` in every record of {p.source}")
            rows = [self._encode(x, -1, f"{where}.source") for x in samples] if metric == "loss" else []
            items = [{**self._eval_item(x, -1), "key": x.get("key")} for x in samples]
            probes.append({"name": p.name, "metric": metric, "rows": rows, "items": items})
        return probes

    def probe_names(self) -> list[str]:
        return [f"{p['name']} ({p['metric']})" for p in self.probes]

    @torch.no_grad()
    def evaluate_probes(self, model) -> list[float]:

        out = []
        with eval_mode(model):
            for p in self.probes:
                if p["metric"] == "loss":
                    total = count = 0.0
                    obj = self.objective()
                    device = next(model.parameters()).device
                    for i in range(0, len(p["rows"]), self.cc.eval_batch_size):
                        batch = {k: v.to(device) for k, v in self.collate(p["rows"][i:i + self.cc.eval_batch_size]).items()}
                        res = obj(model, batch)
                        total, count = total + float(res.loss_sum), count + float(res.count)
                    out.append(total / max(count, 1.0))
                    continue
                answers = greedy_answers(model, self.tokenizer, self.template, [e["prompt"] for e in p["items"]],
                                         self.cc.max_new_tokens, batch_size=self.cc.eval_batch_size)
                if p["metric"] == "contains":
                    hits = [key_hit(a, e["key"]) for a, e in zip(answers, p["items"])]
                else:
                    hits = [normalize_answer(a) == normalize_answer(e["answer"]) for a, e in zip(answers, p["items"])]
                out.append(sum(hits) / max(len(hits), 1))
        return out

    def _encode(self, sample: dict, tid: int, where: str) -> dict:
        if "messages" not in sample:
            raise ConfigError(f"{where}: text tasks need instruction/answer records, got a plain document")
        ids, labels = self.template.encode(sample["messages"], self.recipe.data.loss_on)
        if len(ids) > self.recipe.data.max_length:
            ids, labels = ids[: self.recipe.data.max_length], labels[: self.recipe.data.max_length]
        return {"input_ids": ids, "labels": labels, "task": tid}

    @staticmethod
    def _eval_item(sample: dict, tid: int) -> dict:
        msgs = sample["messages"]
        return {"prompt": msgs[:-1], "answer": msgs[-1]["content"], "task": tid}

    def build_model(self) -> torch.nn.Module:

        return load_model(self.recipe.model, self.recipe.adapter, training=True)

    def objective(self, features: bool = False) -> Objective:
        return ContinualLMObjective(features)

    def collate(self, rows: list) -> dict:
        return self._collate(rows)

    def evaluate(self, model, task: TaskData, batch_size: int) -> float:

        with eval_mode(model):
            answers = greedy_answers(model, self.tokenizer, self.template, [e["prompt"] for e in task.eval],
                                     self.cc.max_new_tokens, batch_size=batch_size)
        hits = [normalize_answer(a) == normalize_answer(e["answer"]) for a, e in zip(answers, task.eval)]
        return sum(hits) / max(len(hits), 1)

    def reference_rows(self, n: int, seed: int) -> list:
        """Documents of the built-in pretraining corpus (no task's questions), loss on every token."""

        tok = self.tokenizer
        docs = corpus(n_docs=max(n, 1), seed=seed)[:n]
        rows = []
        for d in docs:
            ids = list(tok(d, add_special_tokens=False)["input_ids"])
            if tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
            labels = [-100] + ids[1:]
            rows.append({"input_ids": ids, "labels": labels, "task": -1})
        return rows

    @property
    def lora_defaults(self) -> dict:
        a = self.recipe.adapter
        return {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "targets": a.targets, "task_type": "CAUSAL_LM",
                "modules_to_save": list(a.modules_to_save)}


def _prompt_key(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content'].strip()}" for m in messages)


