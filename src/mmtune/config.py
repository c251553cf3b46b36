"""Typed recipe schema. Each field is documented once, here, next to the field.

A recipe is a YAML file validated against :class:`Recipe`. Unknown keys and bad values are
errors that name the key (dotted path), the allowed values and the nearest valid name.
Command-line overrides are dotted ``key=value`` pairs whose values are parsed as YAML.
Validation lives here and only here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .registry import ENCODER_OBJECTIVES, OBJECTIVES, did_you_mean
from .schema import Section, explicitly_set

RECIPE_DIR = Path(__file__).parent / "recipes"


class ModelConfig(Section):
    path: str = Field("builtin:tiny", description="Local Hugging Face model directory, or `builtin:tiny` "
                      "for the tiny Llama-style model mmtune builds in code (no download), or "
                      "`builtin:tiny-pretrained` for it after the demo's continued pretraining.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype. `auto`: bfloat16 on a GPU that supports it, else float32.")
    quantization: Literal["none", "nf4", "fp4"] = Field(
        "none", description="Load the base weights in 4 bit with bitsandbytes (QLoRA). Needs the `qlora` extra.")
    double_quant: bool = Field(True, description="QLoRA double quantization of the quantization constants.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = Field(
        "auto", description="transformers attention kernel. `auto`: for causal training, flash-attention's "
        "varlen kernel over the packed samples on a CUDA GPU with bf16/fp16 weights when flash-attn is "
        "installed (3, then 2), else sdpa with the block-diagonal mask from position_ids; sdpa everywhere "
        "else. A flash or flex kernel that cannot run here falls back to sdpa, with the reason logged.")
    freeze: list[str] = Field(default_factory=list, description="Glob patterns of parameter names to freeze "
                              "(full fine-tuning), e.g. `model.embed_tokens.*`.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code shipped in the model dir.")


class AdapterConfig(Section):
    type: Literal["lora", "none"] = Field("lora", description="`lora` trains PEFT LoRA adapters; `none` trains "
                                          "the full weights (minus `model.freeze`).")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: str | list[str] = Field("all-linear", description="Module names to adapt, or `all-linear` "
                                     "(every linear layer except the output head).")
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha/sqrt(r) (Kalajdzievski 2023).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA, Liu et al. 2024).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full beside the "
                                       "adapter and saved with it (e.g. `lm_head` after adding tokens).")


class SourceConfig(Section):
    path: str = Field(description="JSON, JSONL, Parquet file, a `datasets` directory saved with "
                      "`save_to_disk`, or `builtin:NAME` for a built-in dataset.")
    format: str = Field("auto", description="Record format: auto | alpaca | sharegpt | messages | text.")
    weight: float | None = Field(None, gt=0, description="Share of this source in the mixture (normalised over "
                                 "sources that set it). Mutually exclusive with `repeat`.")
    repeat: float = Field(1.0, gt=0, description="How many times the source is used per epoch (fractions sample).")
    max_records: int | None = Field(None, gt=0, description="Use at most this many records.")
    text_field: str = Field("text", description="Field holding the document for the `text` format.")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description="Training sources (a mixture).")
    eval_sources: list[SourceConfig] = Field(default_factory=list, description="Held-out evaluation sources.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Split this fraction of training records off "
                                 "for evaluation when no eval_sources are given.")
    template: str = Field("auto", description="Chat template: `auto` (the tokenizer's own `chat_template`, "
                          "else chatml) or a built-in: chatml | llama3 | internlm2 | phi3.")
    system_prompt: str | None = Field(None, description="Default system prompt for records that have none.")
    max_length: int = Field(1024, gt=8, description="Max tokens per sample, and per packed row.")
    packing: bool = Field(True, description="Pack samples into rows of max_length (best-fit-decreasing), "
                          "position ids restart per sample, no attention across samples.")
    loss_on: Literal["assistant", "all", "last_turn"] = Field(
        "assistant", description="Tokens that carry loss: every assistant turn (default), the whole "
        "sequence (train on prompt), or the last assistant turn only.")
    reasoning: Literal["rationale", "final_answer", "no_rationale"] = Field(
        "rationale", description="Chain-of-thought answers (\"... Answer: 36\"): `rationale` trains on the "
        "whole answer, `final_answer` keeps the rationale in the context but puts loss only on the text from "
        "the last `answer_marker` on, `no_rationale` cuts the rationale out (the model learns to answer "
        "directly). Answers without the marker are unaffected.")
    answer_marker: str = Field("Answer:", min_length=1, description="Text that introduces the final answer "
                               "in chain-of-thought data.")
    truncation: bool = Field(False, description="Cut samples longer than max_length (dropping, counting and "
                             "reporting any left with no supervised token). When false an overlong sample is "
                             "a bad record.")
    on_bad_record: Literal["error", "skip"] = Field("error", description="Stop at the first bad record with "
                                                   "file, line and problem, or skip bad records and report "
                                                   "counts per reason.")
    num_proc: int = Field(1, ge=1, description="Tokenization worker processes.")
    cache_dir: str | None = Field(".cache/mmtune", description="Tokenized-data cache, keyed by content hash. "
                                  "null disables it.")
    add_eos: bool = Field(True, description="Text format: add EOS after each document (BOS too if the "
                          "tokenizer has one).")


class TrainConfig(Section):
    output_dir: str = Field("runs/default", description="Checkpoints, logs and reports go here.")
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(4, gt=0, description="Rows (packed) or samples (unpacked) per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Linear warmup as a fraction of total steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm; null disables.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="`auto`: bf16 autocast on GPUs "
                                                        "that support it, fp32 on CPU.")
    log_every: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate (loss + sample generations) every N steps.")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (and always at the end).")
    keep_last: int = Field(2, gt=0, description="Checkpoints to keep.")
    nan_policy: Literal["stop", "skip"] = Field("stop", description="On a NaN/inf loss: stop naming the step, "
                                                "or skip the step and count it.")
    eval_prompts: list[str] = Field(default_factory=list, description="Prompts to generate from at each eval "
                                    "(like XTuner's evaluation_inputs).")
    max_new_tokens: int = Field(48, gt=0, description="Generation length for eval prompts.")
    fused_loss: Literal["auto"] | bool = Field(
        "auto", description="Fuse the output head into the cross-entropy (sft / pretrain), so the (tokens, "
        "vocab) logits are never held: Liger-Kernel's fused linear cross-entropy on CUDA when installed (the "
        "`gpu` extra), else mmtune's chunked one, which computes the head on supervised positions only. `auto`: "
        "on (CUDA 1.5B packed: 50.7 -> 34.8 GiB at the same speed, docs/reference/performance.md#anchor-measurements; "
        "CPU SmolLM2-135M: 1.24x tokens/s, 13.2 -> 11.5 GB, docs/reference/performance.md#cpu-levers).")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the decoder (in place; checkpoints keep their names). `auto`: on a "
        "CUDA GPU in one process, unquantized, with triton installed (1.5B packed + fused CE: 19.1k -> 26.1k "
        "tokens/s on an H100, docs/reference/performance.md#anchor-measurements); on CPU for packed runs of at "
        "least 1.5e14 FLOP (6 x parameters x tokens; ~45 steps of SmolLM2-135M at 8 x 512 tokens), where ~3 min of "
        "compiling buys 1.15x tokens/s and halves activation memory (docs/reference/performance.md#cpu-levers).")
    tensorboard: bool = Field(True, description="Also write TensorBoard events when tensorboard is installed.")
    progress: bool = Field(True, description="Show a progress bar.")


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the KL pull towards the reference.")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid DPO (Rafailov 2023) or IPO "
                                                 "(Azar 2023).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: assumed rate of flipped "
                                   "preference labels.")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an added per-token NLL loss on the chosen "
                              "response (RPO / TRL's rpo_alpha); 0 is plain DPO.")
    precompute_ref: bool = Field(False, description="Compute the reference log-probs once before training and "
                                 "cache them in the examples (saves a forward pass per step).")


class DistributedConfig(Section):
    strategy: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="How several processes share the work. `auto`: ddp when started with several "
        "processes (`--nproc N` or torchrun), none otherwise. `none`: one process. `ddp`: whole model on every "
        "rank, gradients averaged (also QLoRA). `fsdp`: FSDP2, parameters, gradients and optimizer state "
        "sharded per decoder layer. `deepspeed`: DeepSpeed ZeRO (`zero_stage`), needs the `deepspeed` extra.")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend. `auto`: nccl (with gloo for CPU objects) on GPUs, gloo on CPU.")
    mixed_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute dtype of sharded parameters (fsdp: MixedPrecisionPolicy, gradients reduced "
        "in fp32; deepspeed: its bf16 mode). `auto`: bf16 when the run trains in bf16 (train.precision), else fp32.")
    cpu_offload: bool = Field(
        False, description="fsdp: keep sharded parameters, gradients and optimizer state in CPU memory "
        "(CPUOffloadPolicy; the optimizer step runs on the CPU). deepspeed: offload the optimizer state "
        "(and with zero_stage 3 the parameters) to the CPU. Trades speed for GPU memory.")
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each layer's gathered parameters after its forward and gather them again "
        "in backward (ZeRO-3 memory). false keeps them until backward (ZeRO-2-like: more memory, less traffic).")
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="deepspeed: ZeRO stage. 1 partitions optimizer state, 2 also gradients, 3 also parameters.")
    deepspeed_config: str | None = Field(
        None, description="deepspeed: path to a DeepSpeed JSON config to use instead of the generated one. "
        "Values `auto` are filled from the recipe; `optimizer`/`scheduler` sections are not allowed (the "
        "recipe's train section defines them).")
    find_unused_parameters: bool = Field(
        False, description="ddp: allow parameters that get no gradient in a step (slower; needed only when a "
        "model skips trainable modules, e.g. a modality absent from a batch).")
    timeout_minutes: float = Field(30, gt=0, description="How long a collective waits for the other ranks "
                                   "before the run fails (a hung rank then stops the run).")


#: The workflows a recipe can run (``workflow:``); each lives in :mod:`mmtune.workflows`.
WORKFLOW_NAMES = ("causal", "multimodal", "encoder", "continual")

#: Settings a workflow does not read: setting one (default value or not) is an error naming it,
#: since it would be silently ignored. ``a.b`` is field b of section a; a bare name is a section.
IGNORED_BY = {
    "causal": ("encoder", "multimodal", "continual"),
    "encoder": ("data.packing", "data.on_bad_record", "data.num_proc", "data.template", "data.system_prompt",
                "data.loss_on", "data.reasoning", "data.answer_marker", "data.truncation", "data.add_eos",
                "data.cache_dir", "dpo", "multimodal", "continual", "train.fused_loss", "train.compile"),
    "multimodal": ("data.sources", "data.eval_sources", "data.eval_fraction", "data.num_proc", "data.cache_dir",
                   "adapter", "model.freeze", "model.gradient_checkpointing", "encoder", "continual",
                   "train.fused_loss", "train.compile"),
    "continual": ("objective", "data.sources", "data.eval_sources", "data.eval_fraction", "data.packing",
                  "data.num_proc", "dpo", "encoder", "multimodal", "train.fused_loss", "train.compile"),
}

_WHERE_INSTEAD = {
    ("multimodal", "data.sources"): "each stage's multimodal.stages[].sources",
    ("multimodal", "data.eval_sources"): "each stage's multimodal.stages[].eval_sources",
    ("multimodal", "adapter"): "multimodal.adapters and the stages' trainability",
    ("multimodal", "model.freeze"): "the stages' trainability (multimodal.stages[])",
    ("continual", "data.sources"): "continual.tasks[].source",
    ("continual", "data.eval_sources"): "continual.tasks[].eval_source",
}

MULTIMODAL_OBJECTIVES = ("sft", "pretrain", "dpo")


def infer_workflow(objective: str, *, multimodal: bool, continual: bool) -> str:
    """The workflow of a recipe without ``workflow:``: its sections, else its objective."""
    if multimodal:
        return "multimodal"
    if continual:
        return "continual"
    return "encoder" if objective in ENCODER_OBJECTIVES else "causal"


class Recipe(Section):
    workflow: Literal["causal", "multimodal", "encoder", "continual"] | None = Field(
        None, description="What the recipe trains: `causal` (a causal LM: sft, pretrain, dpo), `multimodal` "
        "(encoders composed with an LLM, trained in stages), `encoder` (BERT-family objectives and heads), "
        "`continual` (a task sequence with a strategy). null: inferred (a `multimodal` or `continual` section, "
        "else an encoder objective, else causal). A setting the workflow would not read is an error.")
    objective: str = Field("sft", description="Training objective: sft | pretrain | dpo | sft-fused (causal and "
                           "multimodal), mlm | mlm_nsp | mlm_sop | electra | classify | qa | similarity_cross | "
                           "similarity_bi (encoder).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference tuning settings (objective: dpo).")
    encoder: EncoderConfig | None = Field(None, description="BERT-family encoder settings (masking, NSP/SOP, "
                                          "ELECTRA, downstream heads); see mmtune/encoders/config.py.")
    continual: ContinualConfig | None = Field(None, description="Continual learning: an ordered sequence of "
                                              "tasks and a strategy (`mmtune continual RECIPE`); see "
                                              "mmtune/continual/config.py.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Several "
                                           "processes/GPUs (DDP, FSDP2, DeepSpeed ZeRO); see mmtune/distributed/.")
    multimodal: MultimodalConfig | None = Field(None, description="Vision/audio encoders composed with the LLM, "
                                                "modality LoRA adapters and their router, and training stages "
                                                "(`mmtune train` runs them in order); see mmtune/multimodal/config.py.")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        return OBJECTIVES.check(v)  # the names only: no objective module (and no torch) is imported

    @property
    def resolved_workflow(self) -> str:
        """``workflow`` as given, or inferred (see the field)."""
        return self.workflow or infer_workflow(self.objective, multimodal=self.multimodal is not None,
                                               continual=self.continual is not None)

    @model_validator(mode="after")
    def _workflow_reads_every_setting(self) -> Recipe:
        wf = self.resolved_workflow
        inferred = infer_workflow(self.objective, multimodal=self.multimodal is not None,
                                  continual=self.continual is not None)
        if self.workflow is not None and wf != inferred:
            need = {"multimodal": "a `multimodal` section", "continual": "a `continual` section",
                    "encoder": f"an encoder objective ({', '.join(ENCODER_OBJECTIVES)})",
                    "causal": "a causal objective and no multimodal/continual section"}[wf]
            raise ValueError(f"workflow: {wf} needs {need}; this recipe is a {inferred} recipe")
        for key in IGNORED_BY[wf]:
            section, _, name = key.partition(".")
            if name:
                is_set = explicitly_set(getattr(self, section), name)
            elif section in ("encoder", "multimodal", "continual"):
                is_set = getattr(self, section) is not None
            else:
                is_set = explicitly_set(self, section)
            if is_set:
                instead = _WHERE_INSTEAD.get((wf, key))
                raise ValueError(f"'{key}' is not read by {wf} recipes (it would be ignored); remove it"
                                 + (f" (use {instead})" if instead else ""))
        if wf == "causal" and explicitly_set(self, "dpo") and self.objective != "dpo":
            raise ValueError(f"'dpo' settings are read by objective dpo only (objective is {self.objective!r}); "
                             "remove them or set objective: dpo")
        if wf == "multimodal" and self.objective not in MULTIMODAL_OBJECTIVES:
            raise ValueError(f"objective '{self.objective}' is not available for multimodal recipes; use one of "
                             f"{', '.join(MULTIMODAL_OBJECTIVES)}")
        if wf == "encoder" and self.objective == "electra" and self.adapter.type != "none":
            raise ValueError("objective electra trains generator and discriminator in full; set adapter.type: none")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _section_fields(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (a pydantic error location) inside ``model_cls``."""
    cls = model_cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann] + list(inner or [])
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        cls = nxt
    return list(cls.model_fields)


def format_validation_error(err: ValidationError, source: str, model_cls=None) -> str:
    model_cls = model_cls or Recipe
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            valid = _section_fields(model_cls, loc)
            hint = did_you_mean(loc[-1], valid)
            lines.append(f"{source}: unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}")
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            got = e.get("input")
            opts = [o.strip().strip("'") for o in str(allowed).replace(" or ", ",").split(",")]
            lines.append(f"{source}: '{key}' = {got!r} is not allowed; allowed values: {allowed}.{did_you_mean(got, opts)}")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if not loc or e["type"] == "value_error" and isinstance(e.get("input"), dict):
                lines.append(f"{source}: {key + ': ' if key else ''}{msg}")  # a rule across fields: no input echo
            else:
                lines.append(f"{source}: '{key}': {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else parsed
        except ValueError:
            pass
    return key.strip().split("."), parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise ConfigError(f"override '{item}': '{k}' is not an index of the list (0..{len(node) - 1})")
                node = node[int(k)]
                continue
            if not isinstance(node.get(k), (dict, list)):
                node[k] = {}
            node = node[k]
        last = keys[-1]
        if last.isdigit() and isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (see ``mmtune config list``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (RECIPE_DIR / f"{name_or_path}.yaml", RECIPE_DIR / name_or_path):
        if cand.is_file():
            return cand
    names = list_recipes()
    raise ConfigError(f"no recipe file '{name_or_path}' and no shipped recipe of that name.{did_you_mean(name_or_path, names)} "
                      f"Shipped recipes: {', '.join(names)}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None, model_cls: type[BaseModel] | None = None):
    """Load, override and validate a recipe. Raises :class:`ConfigError` naming the bad key."""
    path = resolve_recipe_path(name_or_path)
    data = apply_overrides(load_yaml(path), overrides or [])
    return validate_recipe(data, str(path), model_cls)


def validate_recipe(data: dict, source: str = "<recipe>", model_cls: type[BaseModel] | None = None):
    model_cls = model_cls or Recipe
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, model_cls)) from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# Sections that live with their features; resolve the forward references once all exist.
from .continual.config import ContinualConfig  # noqa: E402
from .encoders.config import EncoderConfig  # noqa: E402
from .multimodal.config import MultimodalConfig  # noqa: E402

Recipe.model_rebuild()
