"""Trainability of a causal LM: PEFT LoRA adapters or full fine-tuning, plus freezing.

One place decides what trains (docs/contributing.md#trainability: applied in one function, logged, and tested as the
exact set of trainable parameter names): :func:`apply_adapter` then :func:`apply_freeze`,
called in that order by :func:`mmtune.models.loading.load_model`.

LoRA layers, DoRA, rsLoRA and adapter files are PEFT's; we only map the recipe onto them.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError

#: PEFT wraps the model as ``PeftModelForCausalLM.base_model (LoraModel).model``; parameter
#: names gain this prefix. Freeze patterns may be written with or without it.
PEFT_PREFIX = "base_model.model."


def lora_config(adapter_cfg: AdapterConfig, *, task_type: str | None = "CAUSAL_LM", exclude_modules=(),
                targets=None, **extra):
    """The ``peft.LoraConfig`` for a recipe's ``adapter`` section: the one LoRA builder every
    workflow uses (causal LM, encoders, composed models, continual strategies).

    ``targets: all-linear`` is PEFT's own shorthand (every ``nn.Linear`` / 4-bit linear except
    the output head). A single module name given as a string is treated as a list of one name
    (PEFT would read a string as a full-match regex over the dotted path, which a bare name
    like ``q_proj`` never matches). ``task_type=None`` for a module that is not a causal LM
    (an encoder backbone, a decoder inside a composed model); ``targets`` overrides the
    section's; ``extra`` goes to ``LoraConfig`` as is.
    """
    from peft import LoraConfig

    targets = adapter_cfg.targets if targets is None else targets
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    kwargs = {"task_type": task_type} if task_type else {}
    return LoraConfig(
        **kwargs, r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha, lora_dropout=adapter_cfg.dropout,
        target_modules=targets, use_rslora=adapter_cfg.rslora, use_dora=adapter_cfg.dora,
        modules_to_save=list(adapter_cfg.modules_to_save) or None, bias="none",
        exclude_modules=list(exclude_modules) or None, **extra,
    )


def _linear_names(model: nn.Module) -> list[str]:
    """Short names (last path component) of the model's linear layers, for error messages."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    return sorted(names)


def apply_adapter(model: nn.Module, adapter_cfg: AdapterConfig | None) -> nn.Module:
    """Wrap ``model`` with LoRA (``type: lora``) or leave every weight trainable (``type: none``).

    Returns the ``PeftModel`` for LoRA (its base weights frozen, the adapters and
    ``modules_to_save`` trainable), the model itself for full fine-tuning.
    """
    if adapter_cfg is None or adapter_cfg.type == "none":
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        return model
    from peft import get_peft_model

    cfg = lora_config(adapter_cfg)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "target" in msg.lower() or "modules_to_save" in msg.lower() or "not found" in msg.lower():
            raise ConfigError(f"adapter.targets={adapter_cfg.targets!r} / adapter.modules_to_save="
                              f"{adapter_cfg.modules_to_save!r}: {msg}. Linear layers in this model: "
                              f"{', '.join(_linear_names(model))} (or use `all-linear`)") from None
        raise


def _matches(name: str, pattern: str) -> bool:
    short = name.replace(PEFT_PREFIX, "", 1)  # also inside a module: `backbone.base_model.model.x`
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(short, pattern)


def apply_freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter whose name matches a glob pattern.

    Patterns are matched (``fnmatch``, case-sensitive) against the full parameter name and,
    for a PEFT model (or a module holding one), against the name without ``base_model.model.``, so
    ``model.embed_tokens.*`` works with and without LoRA. A pattern that matches no parameter
    is a :class:`ConfigError` (a typo would otherwise silently train everything).
    Returns the names frozen, sorted.
    """
    if not patterns:
        return []
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(_matches(n, pat) for n in names):
            examples = ", ".join(sorted({n.rsplit(".", 2)[0] + ".*" for n in names})[:6])
            raise ConfigError(f"model.freeze pattern {pat!r} matches no parameter; names look like: {examples}")
    frozen = []
    for name, p in model.named_parameters():
        if any(_matches(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    return sorted(frozen)


def trainable_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients, sorted."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _numel(p) -> int:
    """Parameter count, counting a bitsandbytes 4-bit weight by its logical size.

    ``Params4bit`` stores two 4-bit values per byte of its storage dtype (PEFT's
    ``get_nb_trainable_parameters`` applies the same correction).
    """
    n = p.numel()
    if type(p).__name__ == "Params4bit":
        storage = getattr(p, "quant_storage", None)
        n *= 2 * (storage.itemsize if storage is not None else 1)
    return n


def trainable_summary(model: nn.Module) -> str:
    """``"trainable 1,234 / 5,678 params (21.7%) in N tensors"``."""
    total = trainable = tensors = 0
    for _, p in model.named_parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
            tensors += 1
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} / {total:,} params ({pct:.1f}%) in {tensors} tensors"
