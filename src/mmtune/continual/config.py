"""The ``continual`` section of a recipe: an ordered sequence of tasks and a strategy.

The recipe's other sections keep their meaning and apply to every task: ``train`` is the
per-task training budget and optimiser (a fresh schedule per task, and a fresh AdamW unless
``keep_optimizer_state``), ``model`` / ``adapter`` / ``data.template`` build the language model
of the ``text`` benchmark. Each strategy documents its own settings (``mmtune.continual.strategies``); they are validated here,
against the chosen strategy, so a typo fails before any training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..registry import did_you_mean
from ..schema import Section

#: Task sources. ``digits:C1,C2,...`` (scikit-learn's bundled 8x8 digits of those classes),
#: ``digits-permuted:SEED`` (all ten classes, pixels permuted by a fixed permutation drawn from
#: SEED; SEED 0 is the identity), ``builtin:TASK`` (an instruction task of
#: mmtune.data.builtin: add | reverse | capital), ``mm:TASK`` (a built-in multimodal task of the
#: ``multimodal`` benchmark: vqa | ocr | asr), or a local JSON / JSONL file of alpaca records
#: ({instruction, input, output}).
SOURCE_SCHEMES = ("digits:", "digits-permuted:", "builtin:", "mm:")


class TaskConfig(Section):
    name: str = Field(description="Task name, used in reports and file names.")
    source: str = Field(description="Training data: `digits:C1,C2,..` | `digits-permuted:SEED` | `builtin:TASK` "
                        "(add, reverse, capital) | a JSON/JSONL file of alpaca records.")
    eval_source: str | None = Field(None, description="Evaluation data, same syntax. Default: the held-out split "
                                    "of `source` (digits test split; `builtin:TASK-eval`).")
    train_size: int | None = Field(None, gt=0, description="Use at most this many training examples.")
    eval_size: int | None = Field(None, gt=0, description="Evaluate on at most this many examples.")
    seen_eval_size: int | None = Field(None, gt=0, description="Text tasks: also score this many of the task's "
                                       "training items, a second matrix (memorisation) beside R (held-out "
                                       "generalisation). null: not scored.")
    metric: Literal["accuracy", "exact_match", "token_accuracy"] | None = Field(
        None, description="How the task is scored. Default: accuracy (digits), exact_match (text: the stripped "
        "greedy answer equals the reference), multimodal: exact_match for mm:vqa, token_accuracy (teacher-forced "
        "next-token accuracy on the answer) for mm:ocr and mm:asr.")
    modalities: list[Literal["text", "image", "audio"]] | None = Field(
        None, description="Input modalities of the task (default: image for digits, text for text tasks). "
        "Checked against what the benchmark's model takes.")
    task_id: int | None = Field(None, ge=0, description="Identifier given with the task's examples, at training "
                                "and, in the task-incremental scenario, at test (masked heads, per-task adapters). "
                                "Default: the task's position in the sequence. Tasks sharing an id share a head.")

    @field_validator("source", "eval_source")
    @classmethod
    def _known_source(cls, v: str | None) -> str | None:
        if v is None or v.startswith(SOURCE_SCHEMES) or Path(v).suffix in (".json", ".jsonl"):
            return v
        raise ValueError(f"unknown source {v!r}; use one of {', '.join(s + '...' for s in SOURCE_SCHEMES)} "
                         "or a .json/.jsonl file")


class ProbeConfig(Section):
    name: str = Field(description="Probe name, used in the report.")
    source: str = Field(description="`general:chat` | `general:questions` (built-in general sets, "
                        "mmtune.continual.general) or a JSON/JSONL file of alpaca records.")
    metric: Literal["loss", "contains", "exact_match"] | None = Field(
        None, description="`loss`: mean next-token loss of the reference answers (nats/token, lower is better). "
        "`contains`: the greedy answer contains the record's `key`. `exact_match`. Default: loss for "
        "general:chat, contains for general:questions, exact_match for files.")
    size: int | None = Field(None, gt=0, description="Use at most this many records.")


class StrategyConfig(Section):
    name: str | list[str] = Field("naive", description="Continual-learning strategy; `mmtune.continual.STRATEGIES` "
                                  "lists them: naive, joint, ewc, online_ewc, lwf, feature_kd, zscl, replay, derpp, "
                                  "agem, gem, task_lora, olora, l2p. Several compose: a list [replay, lwf] or "
                                  "`replay+lwf` (their loss terms add up, each logged under its own name; "
                                  "strategies/compose.py).")
    settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Hyperparameters per strategy name, e.g. {ewc: {lambda: 100}, replay: "
        "{buffer_size: 200}} (each strategy's `Settings` documents its keys). Only the chosen strategies' entries are "
        "used, so a recipe can keep tuned settings for several and switch with `continual.strategy.name=...`; "
        "every entry is validated.")

    @field_validator("name", mode="before")
    @classmethod
    def _split_names(cls, v):
        """`a+b` and [a, b] mean the same composition; one name stays a string."""
        parts = [p.strip() for p in v.split("+")] if isinstance(v, str) else v
        if isinstance(parts, list) and len(parts) == 1:
            return parts[0]
        return parts

    @classmethod
    def from_list(cls, items: list) -> dict:
        """The list form of ``continual.strategy`` (``[{name: replay, settings: {..}}, lwf]``, each
        item with its own settings) as the mapping form ``{name: [...], settings: {name: {..}}}``."""
        names, settings = [], {}
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or set(item) - {"name", "settings"} or "name" not in item:
                raise ValueError(f"item {i} must be a strategy name or {{name: NAME, settings: {{...}}}} (got {item!r})")
            names.append(item["name"])
            if item.get("settings"):
                settings[item["name"]] = item["settings"]
        return {"name": names, "settings": settings}

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @property
    def label(self) -> str:
        """The strategy as one string (`replay+lwf` for a composition)."""
        return "+".join(self.names)

    @model_validator(mode="after")
    def _check_settings(self):
        from ..registry import STRATEGIES

        valid = STRATEGIES.names()
        if not self.names:
            raise ValueError("name: give at least one strategy")
        for name in [*self.names, *self.settings]:
            if name not in STRATEGIES:
                raise ValueError(f"unknown strategy '{name}'; valid: {', '.join(valid)}.{did_you_mean(name, valid)}")
        if len(self.names) > 1:
            classes = [STRATEGIES.get(n) for n in self.names]
            classes[0].check_composable(classes)
        for name, values in self.settings.items():
            STRATEGIES.get(name).parse_settings(values)  # raises ValueError naming the key
        return self

    def settings_for(self, name: str) -> dict[str, Any]:
        """The settings of strategy ``name`` ({} when the recipe gives none)."""
        return dict(self.settings.get(name) or {})

    def chosen_settings(self) -> dict[str, Any]:
        """The settings of the chosen (first) strategy ({} when the recipe gives none)."""
        return self.settings_for(self.names[0])


class DigitsNetConfig(Section):
    arch: Literal["mlp", "transformer"] = Field("mlp", description="`mlp`: 64 -> hidden (x depth, ReLU) -> 10. "
                                                "`transformer`: the 8 pixel rows as tokens, a CLS token, pre-norm "
                                                "encoder layers (needed by the l2p strategy).")
    hidden: int = Field(256, gt=0, description="Hidden width (MLP) or model width (transformer).")
    depth: int = Field(2, gt=0, description="Hidden layers (MLP) or encoder layers (transformer).")
    heads: int = Field(4, gt=0, description="Attention heads (transformer).")


class ContinualConfig(Section):
    benchmark: Literal["digits", "text", "multimodal"] = Field(
        "digits", description="`digits`: Split-Digits on a small classifier (scikit-learn's bundled digits, no "
        "download). `text`: generative instruction tasks on the recipe's language model. `multimodal`: built-in "
        "image and speech tasks (mm:vqa, mm:ocr, mm:asr) on the recipe's LM composed with the tiny vision and audio "
        "towers, one LoRA per modality (mmtune.continual.multimodal).")
    scenario: Literal["class", "task", "domain"] = Field(
        "class", description="`class`: one head over all classes, no task id at test. `task`: the task id is "
        "given at test (masked heads / per-task adapters). `domain`: same label space, the input distribution "
        "changes (e.g. permuted pixels); no task id at test.")
    tasks: list[TaskConfig] = Field(min_length=1, description="The tasks, in training order.")
    probes: list[ProbeConfig] = Field(default_factory=list, description="Text benchmark: sets evaluated before "
                                      "and after every task but never trained on (general ability), reported "
                                      "as a matrix P beside R.")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig, description="How to learn without forgetting: "
                                     "{name, settings}, a name (`replay+lwf` composes), or a list of strategies to "
                                     "compose, each a name or {name, settings: {its own keys}}.")
    keep_optimizer_state: bool = Field(False, description="Carry the optimizer state (AdamW moments and step count, "
                                       "per parameter) from one task to the next, as Avalanche does; false starts "
                                       "each task with a fresh optimizer. The schedule restarts either way. "
                                       "Split-Digits class-incremental, 5 seeds, kept vs reset ACC: replay 91.9 vs "
                                       "87.5, DER++ 93.2 vs 89.6, GEM 93.4 vs 92.8, but A-GEM 36.9 vs 85.7 (with the "
                                       "moments carried over, its projected steps forget as if unprojected: "
                                       "forgetting 77.7 vs 13.9), hence off by default.")
    digits_net: DigitsNetConfig = Field(default_factory=DigitsNetConfig, description="Classifier of the digits "
                                        "benchmark.")
    split_seed: int = Field(0, description="Seed of the digits train/test split (kept fixed across run seeds).")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="Share of the digits held out for evaluation.")
    eval_batch_size: int = Field(256, gt=0, description="Examples per evaluation batch.")
    max_new_tokens: int = Field(16, gt=0, description="Text benchmark: greedy generation length when scoring.")
    curve_every: int | None = Field(None, gt=0, description="Also evaluate every task every N optimizer steps "
                                    "inside each task (finer per-task curves in the report; costs evaluations).")
    report: bool = Field(True, description="Write report.md, the heatmap, the curves and metrics.json at the end "
                         "(off for sweeps: the numbers are still returned and kept in continual/state).")
    learned_threshold: float = Field(0.5, ge=0, le=1, description="A task counts as learned when its accuracy "
                                     "right after training it, R[j][j], reaches this; the report flags runs with "
                                     "unlearned tasks (their forgetting is not meaningful).")
    intransigence_reference: list[float] | str | None = Field(
        None, description="Per-task reference accuracies for the intransigence (Chaudhry et al. 2018): one value "
        "per task, or the metrics.json of a `joint` run of the same tasks (its diagonal). null: n/a.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available, else CPU.")
    torch_threads: int | None = Field(None, gt=0, description="CPU threads for torch during the run "
                                      "(`torch.set_num_threads`); tiny models run fastest on 1, especially on a "
                                      "shared machine. null keeps torch's default.")

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_list(cls, v):
        if isinstance(v, str):  # `strategy: replay+lwf`
            return {"name": v}
        return StrategyConfig.from_list(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        for i, t in enumerate(self.tasks):
            for field in ("source", "eval_source"):
                src = getattr(t, field)
                if src is None:
                    continue
                kind = ("digits" if src.startswith(("digits:", "digits-permuted:")) else
                        "multimodal" if src.startswith("mm:") else "text")
                if kind != self.benchmark:
                    expected = {"digits": "digits:... sources", "multimodal": "mm:vqa | mm:ocr | mm:asr",
                                "text": "builtin:TASK or a file"}[self.benchmark]
                    raise ValueError(f"tasks.{i}.{field} = {src!r} does not fit benchmark '{self.benchmark}' "
                                     f"({expected})")
        return self
