"""Name -> builder registries: the few explicit extension points of mmtune.

Data formats, chat templates, projectors, encoders, objectives, workflows and continual
strategies are registered by name. An unknown name fails loudly with the list of valid names and
the nearest match (like PEFT's ``register_peft_method`` / ModernBERT's ``get_mlp_layer``).

A *lazy entry* (``Registry(kind, lazy={name: module})``) names a builder without importing the
module that defines it: :meth:`Registry.check` validates a name from the list alone (so the recipe
schema checks objective and projector names without importing torch), and :meth:`Registry.get`
imports the module on first use, whose ``@REGISTRY.register(name)`` then fills the entry.
The registries the recipe schema checks live here, at the bottom, for that reason.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str, lazy: dict[str, str] | None = None, package: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(lazy or {})  # name -> module that registers it
        self._package = package  # imported to register every name (when names are not declared one by one)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return deco

    def register_lazy(self, name: str, module: str) -> None:
        """Declare that importing ``module`` registers ``name`` (the module is not imported now)."""
        self._lazy[name] = module

    def check(self, name: str) -> str:
        """``name`` if it is registered or declared lazily, else a :class:`ConfigError` listing the
        valid names; imports nothing."""
        if name not in self:
            names = self.names()
            raise ConfigError(f"unknown {self.kind} '{name}'; valid: {', '.join(names)}.{did_you_mean(name, names)}")
        return name

    def _load_package(self) -> None:
        if self._package is not None:
            importlib.import_module(self._package)

    def get(self, name: str) -> T:
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy[name])
        if name not in self._items:
            self._load_package()
        if name not in self._items:
            self.check(name)
            raise ConfigError(f"{self.kind} '{name}': importing {self._lazy[name]} did not register it")
        return self._items[name]

    def load_all(self) -> None:
        """Import every module with a lazy entry (to list or compare every builder)."""
        self._load_package()
        for module in sorted(set(self._lazy.values())):
            importlib.import_module(module)

    def names(self) -> list[str]:
        self._load_package()
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        if name not in self._items and name not in self._lazy:
            self._load_package()
        return name in self._items or name in self._lazy


# ---------------------------------------------------------------------------------------------
# Registries the recipe schema checks by name. Each module that defines builders registers them
# with ``@REGISTRY.register(name)``; the lazy entries let a recipe be validated without it.

ENCODER_OBJECTIVES = ("mlm", "mlm_nsp", "mlm_sop", "electra", "classify", "qa", "similarity_cross",
                       "similarity_bi")

#: Training objectives (:class:`mmtune.train.objectives.Objective` subclasses).
OBJECTIVES: Registry = Registry("objective", lazy={
    "sft": "mmtune.train.objectives", "pretrain": "mmtune.train.objectives", "dpo": "mmtune.train.dpo",
    "sft-fused": "mmtune.train.fused_ce", **{n: "mmtune.encoders.objectives" for n in ENCODER_OBJECTIVES}})

#: Projectors from encoder features to LLM embeddings (:mod:`mmtune.multimodal.projectors`).
PROJECTORS: Registry = Registry("projector", lazy={
    n: "mmtune.multimodal.projectors" for n in ("mlp2x_gelu", "internvl_pixel_shuffle", "phi4_avgpool")})

#: Audio encoders of composed models by kind (``multimodal.audio.encoder``): ``(path) -> tower``.
AUDIO_ENCODERS: Registry = Registry("audio encoder", lazy={"conformer": "mmtune.multimodal.conformer",
                                                             "whisper": "mmtune.multimodal.whisper"})

#: Workflows: how a recipe becomes training runs (:mod:`mmtune.workflows`).
WORKFLOWS: Registry = Registry("workflow", lazy={
    n: f"mmtune.workflows.{n}" for n in ("causal", "multimodal", "encoder", "continual")})


#: Continual-learning strategies (:mod:`mmtune.continual.strategies`); each strategy module
#: registers itself, the package imports them all (validating their settings needs the classes).
STRATEGIES: Registry = Registry("continual strategy", package="mmtune.continual.strategies")

#: Built-in causal LMs that are built rather than shipped, by name (``builtin:NAME``), each a
#: function ``(cache_root=None, log=print) -> Path`` of a Hugging Face directory.
BUILTIN_MODELS: Registry = Registry("built-in model", lazy={
    "tiny": "mmtune.models.builtin", "smollm2-135m-instruct": "mmtune.models.builtin",
    "tiny-pretrained": "mmtune.pretrained"})
