"""The speed plan of a training run: kernels, dtypes and memory levers, decided once.

:func:`plan_speed` decides them from the device, the installed packages and the recipe's
settings; the run logs the plan once at its start (:meth:`SpeedPlan.lines`), and model loading
(:meth:`SpeedPlan.load_kwargs`), the collate (:func:`causal_collate`) and the objective
(:func:`fused_objective`) take their part of it. ``mmtune train`` and ``benchmarks/gpu_sft.py``
build their run with the same plan and the same functions
(:func:`mmtune.workflows.causal.build_causal_trainer`).

On CPU (the fast path there; measured on SmolLM2-135M, LoRA r16, 8 packed rows of 512 tokens,
2 cores, docs/reference/performance.md#cpu-levers): sdpa with the block-diagonal causal mask
that transformers derives from the packed rows' ``position_ids`` (torch's CPU flash kernel),
fp32 weights and no autocast (without native bf16, AVX2, a bf16 step was over 4x slower),
mmtune's chunked fused cross-entropy, which computes the head only on supervised positions
(1.24x tokens/s, 13.2 -> 11.5 GB peak RSS), and ``torch.compile`` of the decoder on long packed
runs (``CPU_COMPILE_MIN_FLOP``): about 3 minutes of compiling on 2 cores buys 1.15x tokens/s and,
because the compiled backward recomputes elementwise ops instead of keeping them, 11.5 -> 6.3 GB.

On a CUDA GPU:

- attention: flash-attention's varlen kernel when flash-attn is installed and the weights are
  bf16/fp16, with the sample boundaries computed once per batch by the collate
  (``cu_seq_lens_q/k``, ``max_length_q/k``; without them transformers' flash path isolates
  samples only in a batch of one row); else sdpa with the mask from ``position_ids``
  (:func:`mmtune.train.attention.choose_attention`);
- bf16 weights (``model.dtype: auto``) and bf16 autocast (``train.precision: auto``);
- fused linear cross-entropy (``train.fused_loss``): Liger-Kernel's when installed, else
  mmtune's chunked one; the (tokens, vocab) logits are never held (1.5B packed: 50.7 -> 34.8
  GiB at the same speed, docs/reference/performance.md#anchor-measurements);
- ``torch.compile`` of the decoder (``train.compile``) in a one-process, unquantized run
  (1.5B packed + fused CE: 19,068 -> 26,050 tokens/s on an H100, docs/reference/performance.md#anchor-measurements);
- gradient checkpointing only when ``model.gradient_checkpointing`` asks for it (it trades
  about a third of the speed for memory: 19,165 -> 12,277 tokens/s, 50.7 -> 20.1 GiB).

liger-kernel and flash-attn are optional (the ``gpu`` extra) and never required: a lever whose
package is missing falls back, and the plan says so.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from ..data.packing import collate_packed, collate_padded
from ..errors import ConfigError
from ..models.loading import resolve_dtype
from .attention import AttentionChoice, choose_attention
from .fused_ce import FusedCausalLMObjective, unwrap
from .objectives import objective_data

#: Objectives whose loss is next-token cross-entropy from the output head (what the fused loss replaces).
FUSABLE = ("sft", "pretrain", "sft-fused")
#: ``train.compile: auto`` on CPU compiles runs of at least this much work (6 x parameters x
#: tokens): compiling SmolLM2-135M took ~170 s on 2 cores and saved ~4.5 s of a 27.5 s step, so it
#: pays back after ~38 steps of 4096 tokens (1.25e14 FLOP); the threshold is 1.2x that.
CPU_COMPILE_MIN_FLOP = 1.5e14
PACKING_MODES = ("varlen", "position_ids", "padded")
LOSSES = ("liger", "chunked", "plain")


@dataclass(frozen=True)
class SpeedPlan:
    """What a run uses; ``reasons`` says why for each lever (``attention`` is in ``attention.reason``).

    - ``device``, ``dtype`` (the weights), ``bf16_autocast`` (the Trainer's autocast);
    - ``attention``: the kernel for ``from_pretrained(attn_implementation=...)``;
    - ``packing``: ``varlen`` (packed rows plus the flash varlen boundaries per batch),
      ``position_ids`` (packed rows, the mask from restarting positions) or ``padded``;
    - ``loss``: ``liger`` | ``chunked`` (fused linear cross-entropy) | ``plain`` (logits);
    - ``compile``: torch.compile the decoder; ``gradient_checkpointing``.
    """

    device: torch.device
    dtype: torch.dtype
    bf16_autocast: bool
    attention: AttentionChoice
    packing: str
    loss: str
    compile: bool
    gradient_checkpointing: bool
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def varlen(self) -> bool:
        return self.packing == "varlen"

    @property
    def fused(self) -> bool:
        return self.loss != "plain"

    def load_kwargs(self) -> dict:
        """Keywords of :func:`mmtune.models.loading.load_model` that this plan decides."""
        return {"attn_implementation": self.attention.implementation, "dtype": self.dtype,
                "gradient_checkpointing": self.gradient_checkpointing}

    def summary(self) -> dict:
        """The plan as plain values (a benchmark row, a run's result)."""
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "bf16_autocast": self.bf16_autocast, "attn": self.attention.implementation,
                "packing": self.packing, "loss": self.loss, "compile": self.compile,
                "gradient_checkpointing": self.gradient_checkpointing}

    def lines(self) -> list[str]:
        """The plan for the run log, one lever a line."""
        s = self.summary()
        return [f"speed plan on {s['device']}:",
                f"  attention {s['attn']}: {self.attention.reason}",
                f"  packing {self.packing}: {self.reasons['packing']}",
                f"  weights {s['dtype']}, bf16 autocast {'on' if self.bf16_autocast else 'off'}: "
                f"{self.reasons['precision']}",
                f"  loss {self.loss}: {self.reasons['loss']}",
                f"  torch.compile {'on' if self.compile else 'off'}: {self.reasons['compile']}",
                f"  gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}: "
                f"{self.reasons['gradient_checkpointing']}"]


def bf16_autocast(precision: str, device: torch.device | str) -> bool:
    """``train.precision`` -> bf16 autocast, the rule of ``Trainer.use_bf16`` and
    ``mmtune.distributed.train_in_bf16`` (tests/train/test_fast_path.py holds them together)."""
    device = torch.device(device)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def weights_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``model.dtype`` on ``device``: ``auto`` is bfloat16 on a CUDA GPU that supports it (Ampere
    and newer), else float32 (CPU matmuls in bf16 are slow and lossy)."""

    if name == "auto":
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return resolve_dtype(name)


def liger_available() -> bool:
    """liger-kernel importable (it runs on CUDA only; the caller checks the device)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _choose_loss(objective: str, fused_loss, cuda: bool) -> tuple[str, str]:
    if objective not in FUSABLE:
        if fused_loss is True:
            raise ConfigError(f"train.fused_loss=true: objective {objective!r} computes its own loss; the fused "
                              f"loss replaces the cross-entropy of {', '.join(FUSABLE)} (remove the setting)")
        return "plain", f"objective {objective} computes its loss from the logits"
    if fused_loss is False:
        if objective == "sft-fused":
            raise ConfigError("train.fused_loss=false contradicts objective sft-fused (the fused loss); "
                              "use objective sft, or drop train.fused_loss")
        return "plain", "train.fused_loss=false"
    why = "as requested" if (fused_loss is True or objective == "sft-fused") else f"auto on {'CUDA' if cuda else 'CPU'}"
    if not cuda:
        return "chunked", (f"{why}: mmtune's chunked linear cross-entropy on the supervised positions only, "
                           "no (tokens, vocab) logits held")
    if liger_available():
        return "liger", f"{why}: Liger-Kernel's fused linear cross-entropy, no (tokens, vocab) logits held"
    return "chunked", (f"{why}: mmtune's chunked linear cross-entropy, no (tokens, vocab) logits held; "
                       "liger-kernel is not installed (pip install 'mmtune[gpu]')")


def _choose_compile(compile, cuda: bool, world_size: int, quantized: bool, packed: bool,
                    work_flop: float | None) -> tuple[bool, str]:
    if compile is True:
        return True, "train.compile=true"
    if compile is False:
        return False, "train.compile=false"
    if not cuda:
        return _choose_cpu_compile(world_size, quantized, packed, work_flop)
    if world_size > 1:
        return False, "auto: one process only (set train.compile=true to compile under DDP/FSDP)"
    if quantized:
        return False, "auto: not with 4-bit (bitsandbytes) weights"
    if importlib.util.find_spec("triton") is None:
        return False, "auto: triton (torch.compile's GPU code generator) is not installed"
    return True, "auto on CUDA: the decoder, in place (1.5B packed: +37% tokens/s, docs/reference/performance.md#anchor-measurements)"


def _choose_cpu_compile(world_size: int, quantized: bool, packed: bool, work_flop: float | None) -> tuple[bool, str]:
    if world_size > 1 or quantized:
        return False, "auto on CPU: one process, unquantized weights only"
    if not packed:
        return False, "auto on CPU: packed rows only (padded batches change shape and recompile)"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return False, "auto on CPU: no C++ compiler for torch.compile's CPU code"
    if work_flop is None:
        return False, "auto on CPU: the run's size is not known yet"
    if work_flop < CPU_COMPILE_MIN_FLOP:
        return False, (f"auto on CPU: a short run ({work_flop:.1e} FLOP < {CPU_COMPILE_MIN_FLOP:.0e}); "
                       "compiling takes minutes and pays back only on longer runs")
    return True, (f"auto on CPU: a long packed run ({work_flop:.1e} FLOP): 1.15x tokens/s and about half "
                  "the activation memory for ~3 min of compiling (docs/reference/performance.md#cpu-levers)")


def run_work_flop(n_params: int, steps: int, tokens_per_step: int) -> float:
    """Training work of a run, 6 x parameters x tokens (forward and backward)."""
    return 6.0 * n_params * steps * tokens_per_step


def plan_speed(device: torch.device | str, *, model_dtype: str = "auto", precision: str = "auto",
               attention: str = "auto", packing: bool = True, objective: str = "sft", fused_loss="auto",
               compile="auto", gradient_checkpointing: bool = False, world_size: int = 1,
               quantized: bool = False, work_flop: float | None = None) -> SpeedPlan:
    """The speed plan for training on ``device``. Arguments are the recipe's settings
    (``model.dtype``, ``train.precision``, ``model.attn_implementation``, ``data.packing`` for an
    objective that trains on sequences, ``objective``, ``train.fused_loss``, ``train.compile``,
    ``model.gradient_checkpointing``), the run's number of processes and, once known, its work
    (:func:`run_work_flop`; ``compile: auto`` on CPU needs it); see the module docstring."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = weights_dtype(model_dtype, device)
    autocast = bf16_autocast(precision, device)
    attn = choose_attention(attention, device=device, dtype=dtype)
    if not packing:
        mode, why_packing = "padded", "unpacked samples, right-padded with an attention mask"
    elif attn.varlen:
        mode, why_packing = "varlen", "packed rows, the sample boundaries computed once per batch by the collate"
    else:
        mode, why_packing = "position_ids", "packed rows, positions restart per sample (block-diagonal mask)"
    loss, why_loss = _choose_loss(objective, fused_loss, cuda)
    compiled, why_compile = _choose_compile(compile, cuda, world_size, quantized, mode != "padded", work_flop)
    precision_why = f"model.dtype={model_dtype}, train.precision={precision}"
    gc_why = "model.gradient_checkpointing" + ("" if gradient_checkpointing else " is off (memory for speed)")
    return SpeedPlan(device, dtype, autocast, attn, mode, loss, compiled, gradient_checkpointing,
                     {"packing": why_packing, "precision": precision_why, "loss": why_loss, "compile": why_compile,
                      "gradient_checkpointing": gc_why})


def plan_for_recipe(recipe, device: torch.device | str, world_size: int = 1) -> SpeedPlan:
    """:func:`plan_speed` for a causal recipe trained on ``device`` by ``world_size`` processes; the
    CPU compile choice waits for the run's work (:func:`settle_compile`)."""

    sequences = objective_data(recipe.objective) == "sequences"
    return plan_speed(device, model_dtype=recipe.model.dtype, precision=recipe.train.precision,
                      attention=recipe.model.attn_implementation, packing=recipe.data.packing and sequences,
                      objective=recipe.objective, fused_loss=recipe.train.fused_loss, compile=recipe.train.compile,
                      gradient_checkpointing=recipe.model.gradient_checkpointing, world_size=world_size,
                      quantized=recipe.model.quantization != "none")


def settle_compile(plan: SpeedPlan, recipe, work_flop: float, world_size: int = 1) -> SpeedPlan:
    """``plan`` with the compile decision taken now that the run's work is known (the model is
    loaded, the rows are counted): ``train.compile: auto`` on CPU depends on it."""
    if plan.device.type == "cuda" or recipe.train.compile != "auto":
        return plan
    compiled, why = _choose_compile("auto", False, world_size, recipe.model.quantization != "none",
                                    plan.packing != "padded", work_flop)
    return replace(plan, compile=compiled, reasons={**plan.reasons, "compile": why})


def causal_collate(plan: SpeedPlan, pad_id: int):
    """The collate of token rows for ``plan.packing``: packed rows (with the flash varlen
    boundaries in ``varlen`` mode) or padded samples."""
    if plan.packing == "padded":
        return partial(collate_padded, pad_id=pad_id)
    return partial(collate_packed, pad_id=pad_id, varlen=plan.varlen)


def fused_objective(plan: SpeedPlan):
    """The fused-loss objective of ``plan.loss`` (``liger`` or ``chunked``)."""

    if not plan.fused:
        raise ValueError("the plan's loss is plain; build the recipe's own objective")
    return FusedCausalLMObjective(backend=plan.loss)


def decoder_of(model) -> torch.nn.Module:
    """The decoder stack of a causal LM (inside PEFT / DDP wrappers): what torch.compile compiles."""

    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        raise ConfigError(f"train.compile: {type(base).__name__} has no decoder stack to compile "
                          "(set train.compile=false)")
    return decoder


def compile_decoder(model) -> torch.nn.Module:
    """``torch.compile`` the decoder of ``model`` in place (``Module.compile``: parameter names and
    checkpoints are unchanged); the output head stays eager, so the fused loss swaps it freely.
    Returns the compiled decoder. Compiling happens at the first forward."""
    decoder = decoder_of(model)
    decoder.compile()
    return decoder
