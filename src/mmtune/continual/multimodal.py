"""The modality-dynamic task sequence: image and speech tasks on one composed model.

docs/reference/continual.md#scenarios lists the *modality-dynamic task-incremental* scenario: each task's input
modalities may differ, the task id is given. :class:`MultimodalBenchmark` (``continual.benchmark:
multimodal``) runs it on the recipe's language model composed (:mod:`mmtune.multimodal.model`)
with the built-in tiny SigLIP tower (Phi-4 tiling, ``phi4_avgpool`` projector) and the tiny
Conformer (MLP projector), on the built-in data of ``mmtune demo --multimodal``:

- ``mm:vqa``: shapes VQA, single-object questions (colour / count / position of the only shape);
- ``mm:ocr``: the word shown on a square image (one of the 30 built-in words);
- ``mm:asr``: spoken digit strings from the procedural speech engine, transcribed ("3 7 1").

Training and held-out draws use different seeds; every task is scored on its held-out draws: VQA
by exact match of the greedy answer, OCR and ASR by the teacher-forced token accuracy of the
answer (``metric`` chooses either for any task).

What trains. The LM's base weights stay frozen. The encoders and projectors train on every task
(a task trains those its samples go through: the gradient of an image batch never reaches the
audio encoder). On the LM side the modality router picks the adapter: with any strategy but
``task_lora`` the model has one LoRA per modality (``vision`` for image samples, ``speech`` for
audio, Phi-4-multimodal's mixture of LoRAs), all trainable, so replayed speech samples train the
speech adapter while an image task is learned; with ``task_lora`` it has one adapter per task id
(``task0``, ``task1``, ...), and the strategy points the router at the task's adapter at training
and at test. The LoRA shape is the recipe's ``adapter`` section (r, alpha, dropout, targets).

Strategies that read per-token outputs of a plain LM (lwf, feature_kd, zscl, derpp, olora, l2p)
are not available here; naive, joint, replay, agem, ewc, online_ewc and task_lora are.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch

from ..data.templates import get_template
from ..errors import ConfigError
from ..multimodal.config import MMSourceConfig, MultimodalConfig
from ..multimodal.data import LengthPolicy, MediaCache, build_mm_examples, collate_mm
from ..multimodal.model import build_composed_model
from ..multimodal.objective import MultimodalObjective
from ..multimodal.tasks import exact_match_items, load_eval_items, make_demo_data, token_accuracy_items
from ..train.objectives import Objective
from .benchmarks import Benchmark, TaskData, _task_id
from .config import ContinualConfig
from .strategies.base import TaskInfo, eval_mode

#: Built-in tasks: name -> (index in the demo data generator's sizes, greedy tokens when scoring,
#: default metric). OCR and ASR exact match stays at 0 for a 1M-parameter LM within minutes of
#: CPU training (the multimodal demo's OCR sits at the prior), so they are scored by the
#: teacher-forced token accuracy of the answer, which moves (and can be forgotten) at this scale.
MM_TASKS = {"vqa": (1, 5, "exact_match"), "ocr": (2, 8, "token_accuracy"), "asr": (4, 10, "token_accuracy")}
SUPPORTED = ("naive", "joint", "replay", "agem", "ewc", "online_ewc", "task_lora")
#: Parameters of the encoders and projectors (every one trains on the tasks that reach it).
ENCODER_PREFIXES = ("vision_encoder.", "vision_projector.", "audio_encoder.", "audio_projector.")
MODALITY_ADAPTERS = ("vision", "speech")
EVAL_SEED = 1000


def _modality_lora(name: str) -> bool:
    return re.search(r"\.lora_[AB]\.(vision|speech)\.", name) is not None


def multimodal_config(adapters: list[dict]):
    """The composition of the benchmark: tiny SigLIP (phi4 tiling, phi4_avgpool), tiny Conformer
    (MLP projector), the given LM adapters; the one stage describes what trains (see module)."""

    return MultimodalConfig.model_validate({
        "vision": {"path": "builtin:tiny-siglip", "tiling": "phi4", "max_crops": 4, "projector": "phi4_avgpool"},
        "audio": {"path": "builtin:tiny-conformer"},
        "vision_speech": False,
        "adapters": adapters,
        "stages": [{"name": "continual", "sources": [],
                    "trainable": {"vision_encoder": "full", "vision_projector": "full", "audio_encoder": "full",
                                  "audio_projector": "full"}}],
    })


class MultimodalBenchmark(Benchmark):
    """VQA, OCR and speech tasks on a composed model (module docstring)."""

    modalities = ("text", "image", "audio")

    def __init__(self, recipe, cc: ContinualConfig):

        if cc.scenario != "task":
            raise ConfigError("continual.scenario: the multimodal benchmark is modality-dynamic task-incremental; "
                              "use `task`")
        name = cc.strategy.name
        if name not in SUPPORTED:
            raise ConfigError(f"continual.strategy.name = {name}: not available on the multimodal benchmark; use one "
                              f"of {', '.join(SUPPORTED)}")
        self.recipe, self.cc, self.scenario = recipe, cc, cc.scenario
        self.per_task_adapters = name == "task_lora"
        a = recipe.adapter
        spec = {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "targets": a.targets}
        ids = list(dict.fromkeys(_task_id(t, i) for i, t in enumerate(cc.tasks)))
        names = [f"task{i}" for i in ids] if self.per_task_adapters else list(MODALITY_ADAPTERS)
        self.mm = multimodal_config([{"name": n, **spec} for n in names])
        probe = self._compose()  # tokenizer and media processing (they do not depend on the weights)
        self.template = get_template(recipe.data.template, probe.tokenizer, recipe.data.system_prompt)
        pad = probe.tokenizer.pad_token_id
        pad = pad if pad is not None else probe.tokenizer.eos_token_id

        self._collate = partial(collate_mm, pad_id=pad)
        self.policy = LengthPolicy(recipe.data.max_length, recipe.data.truncation, "assistant")
        cache = MediaCache(probe)
        root = Path(recipe.train.output_dir) / "data"
        self.tasks, self.max_new = [], {}
        for i, t in enumerate(cc.tasks):
            self._check_modalities(t, i)
            if t.metric not in (None, "exact_match", "token_accuracy"):
                raise ConfigError(f"continual.tasks.{i}.metric: multimodal tasks are scored by exact_match or "
                                  "token_accuracy")
            kind = self._kind(t.source, f"continual.tasks.{i}.source")
            ev_kind = self._kind(t.eval_source, f"continual.tasks.{i}.eval_source") if t.eval_source else kind
            tid = _task_id(t, i)
            train = self._rows(probe, cache, root / f"{i:02d}-train", kind, t.train_size or 300, seed=i, tid=tid)
            ev = self._eval_items(probe, cache, root / f"{i:02d}-eval", ev_kind, t.eval_size or 30,
                                  seed=EVAL_SEED + i, tid=tid)
            self.max_new[i] = MM_TASKS[ev_kind][1]
            self.tasks.append(TaskData(TaskInfo(i, t.name, tid, None), train, ev, t.metric or MM_TASKS[ev_kind][2]))

    @staticmethod
    def _kind(src: str, where: str) -> str:
        kind = src.removeprefix("mm:")
        if kind not in MM_TASKS:
            raise ConfigError(f"{where} = {src!r}: built-in multimodal tasks are {', '.join('mm:' + k for k in MM_TASKS)}")
        return kind

    def _compose(self):

        return build_composed_model(self.mm, self.recipe.model, None, seed=self.recipe.train.seed)

    @staticmethod
    def _jsonl(root: Path, kind: str, n: int, seed: int) -> Path:

        sizes = [1, 1, 1, 1, 1]
        sizes[MM_TASKS[kind][0]] = n
        return make_demo_data(root, tuple(sizes), seed)[kind]

    def _rows(self, model, cache, root: Path, kind: str, n: int, seed: int, tid: int) -> list[dict]:

        path = self._jsonl(root, kind, n, seed)
        rows, _ = build_mm_examples([MMSourceConfig(path=str(path), max_records=n)], model, self.template,
                                    self.policy, "error", seed, cache)
        return [{**r, "task": tid} for r in rows]

    def _eval_items(self, model, cache, root: Path, kind: str, n: int, seed: int, tid: int) -> list[dict]:

        items = load_eval_items(self._jsonl(root, kind, n, seed), model, cache, kind)[:n]
        return [{**it, "task": tid} for it in items]

    # ---------------------------------------------------------------- Benchmark
    def build_model(self) -> torch.nn.Module:
        return self._compose()

    def objective(self, features: bool = False) -> Objective:

        return MultimodalObjective()

    def collate(self, rows: list) -> dict:
        return self._collate(rows)

    def before_task(self, model, task: TaskInfo) -> None:
        """Encoders and projectors train; the modality adapters too, unless the strategy trains a
        per-task adapter (then its choice for the LM stands); the LM's base weights never."""
        for n, p in model.named_parameters():
            mine = n.startswith(ENCODER_PREFIXES)
            lm = p.requires_grad if self.per_task_adapters else _modality_lora(n)
            p.requires_grad_(p.is_floating_point() and (mine or (n.startswith("language_model.") and lm)))

    def evaluate(self, model, task: TaskData, batch_size: int) -> float:

        with eval_mode(model), torch.no_grad():
            if task.metric == "token_accuracy":
                return token_accuracy_items(model, self.template, task.eval, batch_size)
            return exact_match_items(model, self.template, task.eval, self.max_new[task.info.index])

    @property
    def lora_defaults(self) -> dict:
        a = self.recipe.adapter
        return {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "targets": a.targets, "task_type": "CAUSAL_LM"}
