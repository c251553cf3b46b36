"""Modality paths: how one kind of media (images, audio, ...) enters the language model.

A :class:`ModalityPath` holds everything one modality needs, in one file per modality
(:mod:`.image`, :mod:`.audio`): its encoder and projector(s) (the trainable *components*, named
as recipes name them under ``trainable:``), its placeholder token and text tag, its
preprocessing (raw media -> a processed item with ``num_tokens``, known before the encoder
runs), how its features are computed for a route, and how its components are described in and
rebuilt from a saved composed model. The composed model
(:class:`~mmtune.multimodal.composed.ComposedModel`) keeps its paths in an ``nn.ModuleDict``
keyed by modality name (torchtune's ``EarlyFusionModel(decoder, encoders: Dict,
encoder_tokens: Dict)``) and derives its routing groups from the modalities present
(:func:`mmtune.multimodal.groups.modality_groups`).

Paths are registered by modality name in :data:`MODALITIES` (``@MODALITIES.register("image")``),
every module of this package on first use. Adding a modality (video, depth, ...) is one new file with a
registered path class plus its recipe section (docs/extending.md).
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ...errors import MMTuneError
from ...registry import Registry

#: Modality name -> :class:`ModalityPath` subclass. Every module of this package registers its
#: path on first use of the registry (:func:`modality_classes`): a new modality file needs no
#: entry anywhere else.
MODALITIES: Registry = Registry("modality")


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def modality_classes() -> list[type[ModalityPath]]:
    """Every registered path class, in canonical order (``order``, then name): image, audio, others."""
    _discover()
    return sorted((MODALITIES.get(n) for n in MODALITIES.names()), key=lambda c: (c.order, c.name))


def owner_of(component: str) -> type[ModalityPath] | None:
    """The path class that declares ``component`` (None: not a modality component)."""
    return next((c for c in modality_classes() if component in c.COMPONENTS), None)


class ModalityPath(nn.Module, metaclass=abc.ABCMeta):
    """One modality's way into the LM (module docstring).

    Subclasses set the class attributes and implement :meth:`process`, :meth:`encode`,
    :meth:`describe_component` and :meth:`load_component`; the encoder and projector modules
    are attributes named in ``COMPONENTS`` (component name -> attribute), None when absent.

    Class attributes:
        name: the modality name, also its routing group (``image``, ``audio``).
        tag: the text tag a record marks the media with (``<image>``).
        default_token: the placeholder token added to the tokenizer.
        default_adapter: the LM adapter the modality's group takes when the router does not say
            (the adapter of that name, if the model has one).
        config_key: the ``multimodal`` section that configures it (``vision``, ``audio``).
        COMPONENTS: ``{component name: attribute}``, in the order stages and saved files list them.
        order: sort key among modalities (groups, saved files).
    """

    name: ClassVar[str]
    tag: ClassVar[str]
    default_token: ClassVar[str]
    default_adapter: ClassVar[str | None] = None
    config_key: ClassVar[str]
    COMPONENTS: ClassVar[dict[str, str]]
    order: ClassVar[int] = 100

    def __init__(self, processor=None, token: str | None = None):
        super().__init__()
        self.processor = processor
        self.token = token or self.default_token
        self.token_id: int | None = None  # set by the composed model from its tokenizer

    # -- components ---------------------------------------------------------------------------
    def components(self) -> dict[str, nn.Module | None]:
        """``{component name: module or None}`` in declaration order."""
        return {c: getattr(self, attr) for c, attr in self.COMPONENTS.items()}

    def route_components(self, route) -> tuple[str, ...]:
        """The components a batch of ``route`` runs through on this path (stage planning)."""
        return tuple(c for c, m in self.components().items() if m is not None)

    def processor_dict(self) -> dict | None:
        """The preprocessing settings saved in processor.json under :attr:`name`."""
        from dataclasses import asdict

        return asdict(self.processor) if self.processor is not None else None

    def save_files(self, directory: Path) -> None:
        """Extra files a saved model needs besides the component weights (default: none)."""

    # -- what a modality implements -----------------------------------------------------------
    @abc.abstractmethod
    def process(self, raw):
        """Raw media -> a processed item with ``num_tokens`` (DataError for unusable media)."""

    @abc.abstractmethod
    def encode(self, items: Sequence, route) -> torch.Tensor:
        """Processed items -> ``(sum of num_tokens, H)`` LM-width features, item by item."""

    def describe_component(self, component: str, module: nn.Module) -> dict:
        """What :meth:`load_component` needs to rebuild ``module`` (saved in mmtune_composed.json)."""
        if component in self.projector_components():
            return describe_projector(module)
        raise MMTuneError(f"modality '{self.name}' cannot describe component '{component}'")

    @classmethod
    def load_component(cls, directory: Path, component: str, desc: dict) -> nn.Module:
        """An empty module for ``desc`` (weights are loaded afterwards)."""
        if desc["kind"] == "projector":
            from ..projectors import build_projector

            return build_projector(desc["name"], desc["in_dim"], desc["out_dim"])
        raise MMTuneError(f"{directory}: unknown component kind {desc['kind']!r} for {component}")

    @classmethod
    @abc.abstractmethod
    def from_saved(cls, modules: dict[str, nn.Module], processor: dict | None, token: str | None) -> ModalityPath:
        """The path from its loaded component modules and saved processor settings."""

    @classmethod
    @abc.abstractmethod
    def build_encoder(cls, section, cache_root: str | Path | None = None) -> nn.Module:
        """The encoder a recipe's ``multimodal.<config_key>`` section names."""

    @classmethod
    @abc.abstractmethod
    def build(cls, section, mm_cfg, encoder: nn.Module, hidden: int, dtype: torch.dtype,
              token: str | None = None) -> ModalityPath:
        """A fresh path around ``encoder`` for an LM of width ``hidden``: new projectors (the
        caller seeds them), encoder LoRA where a stage of ``mm_cfg`` trains the encoder as lora."""

    @classmethod
    def projector_components(cls) -> tuple[str, ...]:
        return tuple(c for c in cls.COMPONENTS if "projector" in c)


def stages_use_lora(mm_cfg, component: str) -> bool:
    """Whether some stage of ``mm_cfg`` trains ``component`` as ``lora``."""
    return any(getattr(s.trainable, component, "frozen") == "lora" for s in mm_cfg.stages)


def describe_projector(module: nn.Module) -> dict:
    return {"kind": "projector", "name": module.projector_name, "in_dim": module.in_dim, "out_dim": module.out_dim}

