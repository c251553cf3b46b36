"""Stage trainability: one function decides what trains, logs it, and builds the optimizer groups.

A stage declares per component ``frozen | lora | full`` (torchtune's ``TrainableParams``);
:func:`apply_stage` freezes everything and then enables exactly the declared set:

=====================  ===============================================================
component mode         trainable parameters
=====================  ===============================================================
encoder ``full``       every parameter of the encoder (its LoRA too, if injected)
encoder ``lora``       only the encoder's LoRA weights (``vision.lora`` / ``audio.lora``)
projector ``full``     every parameter of the projector
llm ``lora``           the weights of the stage's ``adapter`` (one PEFT adapter), nothing else
llm ``full``           the LM's base weights (all LoRA adapters stay as they are)
=====================  ===============================================================

The plan returned lists the trainable parameter names (sorted; tests compare them as a set),
their count per component, and one optimizer group per component with its learning rate
(``stage.lr[component]``, default ``train.lr``). Nothing else in mmtune sets ``requires_grad``
on a composed model; the router only restores these flags after PEFT switches adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from .composed import ComposedModel
from .config import COMPONENTS, StageConfig

log = logging.getLogger(__name__)



@dataclass
class StagePlan:
    """What a stage trains. ``groups`` are optimizer param groups ``{"params", "lr", "component"}``."""

    stage: str
    trainable: list[str]
    count: int
    per_component: dict[str, int]
    groups: list[dict] = field(repr=False)
    adapter: str | None = None
    modes: dict[str, str] = field(default_factory=dict)
    #: ``route -> components`` its forward pass runs through (the model's
    #: :meth:`~mmtune.multimodal.composed.ComposedModel.route_components`).
    route_components: Callable[..., tuple[str, ...]] = field(default=lambda route: (), repr=False)

    def summary(self) -> str:
        parts = ", ".join(f"{c} {self.modes[c]} ({n:,})" for c, n in self.per_component.items() if n)
        return f"stage '{self.stage}': {self.count:,} trainable parameters in {len(self.trainable)} tensors: {parts}"

    def trains_route(self, route) -> bool:
        """Whether a batch of ``route`` reaches a trainable parameter (else it has no gradient)."""
        if any(self.per_component.get(c, 0) for c in self.route_components(route)):
            return True
        if self.modes.get("llm") == "full":
            return True
        return self.modes.get("llm") == "lora" and route.adapter == self.adapter


def _adapter_parameters(lm: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters of one PEFT adapter (every adapter layer's entry for ``adapter``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids = set()
    for module in lm.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layers = getattr(module, layer_name)
                if adapter in layers:
                    ids.update(id(p) for p in layers[adapter].parameters())
    return [(n, p) for n, p in lm.named_parameters() if id(p) in ids]


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def _selected(model: ComposedModel, component: str, mode: str, adapter: str | None) -> list[tuple[str, nn.Parameter]]:
    module = model.component(component)
    if mode == "frozen":
        return []
    if module is None:
        raise ConfigError(f"trainable.{component} is {mode} but the model has no {component}")
    params = list(module.named_parameters())
    if component == "llm":
        if mode == "full":
            return [(n, p) for n, p in params if not _is_lora(n)]
        names = sorted(getattr(module, "peft_config", {}))
        if adapter not in names:
            raise ConfigError(f"stage adapter '{adapter}' is not an adapter of the model; adapters: "
                              f"{', '.join(names) or 'none'}")
        return _adapter_parameters(module, adapter)
    if mode == "lora":
        lora = [(n, p) for n, p in params if _is_lora(n)]
        if not lora:
            raise ConfigError(f"trainable.{component} is lora but the {component} has no LoRA weights (set "
                              f"multimodal.{component.split('_')[0]}.lora)")
        return lora
    return params


def apply_stage(model: ComposedModel, stage: StageConfig, default_lr: float, log_fn=None) -> StagePlan:
    """Make exactly the parameters ``stage.trainable`` declares trainable; return the plan.

    Parameter names in the plan are those of ``model.named_parameters()``. Logs a summary
    (``log_fn``, default the module logger) and the full name list at debug level.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    modes = {c: getattr(stage.trainable, c) for c in COMPONENTS}
    prefix = {c: ("language_model" if c == "llm" else c) + "." for c in COMPONENTS}
    groups, names, per_component = [], [], {}
    for comp in COMPONENTS:
        chosen = _selected(model, comp, modes[comp], stage.adapter)
        for _, p in chosen:
            p.requires_grad_(True)
        per_component[comp] = sum(p.numel() for _, p in chosen)
        if chosen:
            groups.append({"params": [p for _, p in chosen], "lr": stage.lr.get(comp, default_lr), "component": comp})
            names += [prefix[comp] + n for n, _ in chosen]
    if not names:
        raise ConfigError(f"stage '{stage.name}' trains nothing: set at least one of {', '.join(COMPONENTS)} "
                          "to lora or full under `trainable`")
    plan = StagePlan(stage.name, sorted(names), sum(per_component.values()), per_component, groups, stage.adapter,
                     modes, model.route_components)
    (log_fn or log.info)(plan.summary())
    log.debug("stage '%s' trainable parameters:\n%s", stage.name, "\n".join(plan.trainable))
    return plan


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``, sorted (the check tests make)."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)
