"""The ``continual`` section of a recipe: an ordered sequence of tasks and a strategy.

The recipe's other sections keep their meaning and apply to every task: ``train`` is the
per-task training budget and optimiser (a fresh AdamW and schedule per task), ``model`` /
``adapter`` / ``data.template`` build the language model of the ``text`` benchmark. Each
strategy documents its own settings (``mmtune.continual.strategies``); they are validated here,
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
#: mmtune.data.builtin: add | reverse | capital), or a local JSON / JSONL file of alpaca records
#: ({instruction, input, output}).
SOURCE_SCHEMES = ("digits:", "digits-permuted:", "builtin:")


class TaskConfig(Section):
    name: str = Field(description="Task name, used in reports and file names.")
    source: str = Field(description="Training data: `digits:C1,C2,..` | `digits-permuted:SEED` | `builtin:TASK` "
                        "(add, reverse, capital) | a JSON/JSONL file of alpaca records.")
    eval_source: str | None = Field(None, description="Evaluation data, same syntax. Default: the held-out split "
                                    "of `source` (digits test split; `builtin:TASK-eval`).")
    train_size: int | None = Field(None, gt=0, description="Use at most this many training examples.")
    eval_size: int | None = Field(None, gt=0, description="Evaluate on at most this many examples.")
    metric: Literal["accuracy", "exact_match"] | None = Field(
        None, description="How the task is scored. Default: accuracy (digits), exact_match (text: the stripped "
        "greedy answer equals the reference).")
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


class StrategyConfig(Section):
    name: str = Field("naive", description="Continual-learning strategy; `mmtune.continual.STRATEGIES` lists "
                      "them: naive, joint, ewc, online_ewc, lwf, feature_kd, zscl, replay, derpp, agem, "
                      "task_lora, olora, l2p.")
    settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Hyperparameters per strategy name, e.g. {ewc: {lambda: 100}, replay: "
        "{buffer_size: 200}} (each strategy's `Settings` documents its keys). Only the chosen strategy's entry is "
        "used, so a recipe can keep tuned settings for several and switch with `continual.strategy.name=...`; "
        "every entry is validated.")

    @model_validator(mode="after")
    def _check_settings(self):
        from ..registry import STRATEGIES

        names = STRATEGIES.names()
        for name in [self.name, *self.settings]:
            if name not in STRATEGIES:
                raise ValueError(f"unknown strategy '{name}'; valid: {', '.join(names)}.{did_you_mean(name, names)}")
        for name, values in self.settings.items():
            STRATEGIES.get(name).parse_settings(values)  # raises ValueError naming the key
        return self

    def chosen_settings(self) -> dict[str, Any]:
        """The settings of the chosen strategy ({} when the recipe gives none)."""
        return dict(self.settings.get(self.name) or {})


class DigitsNetConfig(Section):
    arch: Literal["mlp", "transformer"] = Field("mlp", description="`mlp`: 64 -> hidden (x depth, ReLU) -> 10. "
                                                "`transformer`: the 8 pixel rows as tokens, a CLS token, pre-norm "
                                                "encoder layers (needed by the l2p strategy).")
    hidden: int = Field(256, gt=0, description="Hidden width (MLP) or model width (transformer).")
    depth: int = Field(2, gt=0, description="Hidden layers (MLP) or encoder layers (transformer).")
    heads: int = Field(4, gt=0, description="Attention heads (transformer).")


class ContinualConfig(Section):
    benchmark: Literal["digits", "text"] = Field(
        "digits", description="`digits`: Split-Digits on a small classifier (scikit-learn's bundled digits, no "
        "download). `text`: generative instruction tasks on the recipe's language model.")
    scenario: Literal["class", "task", "domain"] = Field(
        "class", description="`class`: one head over all classes, no task id at test. `task`: the task id is "
        "given at test (masked heads / per-task adapters). `domain`: same label space, the input distribution "
        "changes (e.g. permuted pixels); no task id at test.")
    tasks: list[TaskConfig] = Field(min_length=1, description="The tasks, in training order.")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig, description="How to learn without forgetting.")
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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available, else CPU.")
    torch_threads: int | None = Field(None, gt=0, description="CPU threads for torch during the run "
                                      "(`torch.set_num_threads`); tiny models run fastest on 1, especially on a "
                                      "shared machine. null keeps torch's default.")

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
                digits = src.startswith(("digits:", "digits-permuted:"))
                if digits != (self.benchmark == "digits"):
                    raise ValueError(f"tasks.{i}.{field} = {src!r} does not fit benchmark '{self.benchmark}' "
                                     f"({'digits:... sources' if self.benchmark == 'digits' else 'builtin:TASK or a file'})")
        return self
