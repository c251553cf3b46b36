"""Load a trained causal LM for inference: a base or merged directory, a base + LoRA adapter, a
training checkpoint or a run's output directory (used by chat, serve, eval and the continual
text benchmark alike)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MMTuneError
from ..export import find_checkpoint, read_meta
from .loading import load_tokenizer, resolve_dtype, resolve_model_path, set_offline


def load_for_chat(model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: str = "auto",
                  device: str | None = None):
    """Load ``(model, tokenizer)`` for inference from any of:

    - a base or merged model directory (or ``builtin:tiny``), optionally with ``adapter_dir``
      (an adapter directory, a trainer checkpoint or a run output directory);
    - a trainer checkpoint or run output directory (its LoRA applied to ``meta.json``'s base,
      or its full model);
    - an exported adapter directory (its base from ``base_model_name_or_path``).

    The tokenizer comes from the checkpoint/adapter directory when it has one (it may have
    gained tokens in training), else from the model directory. The model is in eval mode on
    ``device`` (default: CUDA if available, else CPU) in ``dtype`` (see ``model.dtype``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    base, adapter, tok_dir = _chat_sources(model_dir, adapter_dir)
    base = resolve_model_path(base)
    set_offline()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(dtype), local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer = load_tokenizer(tok_dir or base)
    return model, tokenizer


def _checkpoint_sources(ckpt: Path, base_override=None):
    meta = read_meta(ckpt)
    tok = ckpt / "tokenizer" if (ckpt / "tokenizer" / "tokenizer_config.json").is_file() else None
    if meta["adapter"] == "none":
        return ckpt / "model", None, tok
    return base_override or meta["base_model"], ckpt / "model", tok


def _adapter_sources(d: Path, base_override=None):
    cfg_path = d / "adapter_config.json"
    base = base_override or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise MMTuneError(f"{cfg_path} has no base_model_name_or_path: give the base model directory")
    return base, d, d if (d / "tokenizer_config.json").is_file() else None


def _chat_sources(model_dir, adapter_dir):
    """(base model path, adapter dir or None, tokenizer dir or None) for :func:`load_for_chat`."""
    p = Path(str(model_dir))
    if adapter_dir is None:
        ckpt = find_checkpoint(p) if p.is_dir() else None
        if ckpt is not None:
            return _checkpoint_sources(ckpt)
        if (p / "adapter_config.json").is_file():
            return _adapter_sources(p)
        return model_dir, None, None
    a = Path(adapter_dir)
    if not a.exists():
        raise MMTuneError(f"adapter path '{a}' does not exist")
    ckpt = find_checkpoint(a)
    if ckpt is not None:
        base, adapter, tok = _checkpoint_sources(ckpt, base_override=model_dir)
        if adapter is None:
            raise MMTuneError(f"checkpoint '{ckpt}' is a full fine-tune, not an adapter: load it as the model")
        return base, adapter, tok
    if not (a / "adapter_config.json").is_file():
        raise MMTuneError(f"adapter path '{a}' has no adapter_config.json (not a PEFT adapter directory)")
    return _adapter_sources(a, base_override=model_dir)
