"""LoRA on a composed model: the LM's modality adapters (PEFT, one per modality, picked by the
router), LoRA injected into an encoder (always active), and the placeholder tokens the tokenizer
gains for the media (their embedding rows initialised to the mean of the old rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..models.adapters import lora_config
from .config import AdapterSpec


def base_lm(lm: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or ``lm`` itself)."""
    return lm.get_base_model() if hasattr(lm, "peft_config") else lm


def add_placeholder_tokens(tokenizer, tokens: Sequence[str]) -> int:
    """Add ``tokens`` as special tokens (never split, never merged with neighbours); returns how
    many were new. The caller resizes the LM's embeddings."""
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return len(new)


@torch.no_grad()
def init_new_rows(language_model: nn.Module, n: int) -> None:
    """New placeholder rows of the input embeddings: the mean of the old rows. Their input
    embeddings are always replaced by features; the rows matter only as output logits (tied
    heads), which generation masks out."""
    emb = language_model.get_input_embeddings().weight
    if emb.device.type == "meta":
        return
    emb[-n:] = emb[:-n].mean(dim=0, keepdim=True)
    head = language_model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        head.weight[-n:] = head.weight[:-n].mean(dim=0, keepdim=True)


def _lora_config(spec: AdapterSpec):

    return lora_config(AdapterConfig(type="lora", r=spec.r, alpha=spec.alpha, dropout=spec.dropout,
                                     targets=spec.targets))


def add_adapters(language_model: nn.Module, specs: Sequence[AdapterSpec]) -> nn.Module:
    """The LM wrapped by PEFT with one LoRA adapter per spec (B = 0: each starts as the identity)."""
    if not specs:
        return language_model
    from peft import get_peft_model

    for s in specs:
        if s.name == "default":
            raise ConfigError("adapter name 'default' is reserved by PEFT; name adapters after their modality")
    first, *rest = specs
    try:
        model = get_peft_model(language_model, _lora_config(first), adapter_name=first.name)
        for s in rest:
            model.add_adapter(s.name, _lora_config(s))
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in language_model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"multimodal.adapters: {str(e).splitlines()[0]}. Linear layers of this model: "
                          f"{', '.join(names)} (or use all-linear)") from None
    return model


def inject_encoder_lora(module: nn.Module, spec: AdapterSpec | dict) -> nn.Module:
    """LoRA (PEFT ``inject_adapter_in_model``) on an encoder's linear layers, always active; the
    spec is remembered on the module so that saving and loading re-inject it."""
    from peft import inject_adapter_in_model

    spec = spec if isinstance(spec, dict) else spec.model_dump()
    targets = spec["targets"]
    if targets == "all-linear":  # every linear layer of the encoder (PEFT's shorthand skips a model's head)
        targets = sorted({n for n, m in module.named_modules() if isinstance(m, nn.Linear)})
    cfg = lora_config(AdapterConfig(type="lora", r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"]),
                      task_type=None, targets=targets)
    try:
        inject_adapter_in_model(cfg, module, adapter_name="default")
    except ValueError as e:
        raise ConfigError(f"encoder LoRA: {str(e).splitlines()[0]}") from None
    module._mmtune_lora = spec
    return module


def encoder_lora_spec(module: nn.Module) -> dict | None:
    """The encoder LoRA settings :func:`inject_encoder_lora` put on ``module`` (None: none)."""
    return getattr(module, "_mmtune_lora", None)
