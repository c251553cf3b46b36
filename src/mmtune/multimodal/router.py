"""The modality router: which LoRA adapter (and which audio projector) a sample goes through.

Phi-4-multimodal keeps its language model frozen and adds one LoRA per modality; the adapter is
chosen from the input's modalities (docs/reference/multimodal.md#modality-router):

=============  ==========================  ============================
group          adapter (default)           audio projector
=============  ==========================  ============================
text           none: the base model        -
image          vision                      -
audio          speech                      audio_projector (speech)
image+audio    vision                      audio_projector_vs
=============  ==========================  ============================

A text-only sample therefore runs the unmodified base model, so multimodal training cannot
change text behaviour (the demo measures it). The mapping is configurable
(:class:`~mmtune.multimodal.config.RouterConfig`), e.g. to give text its own adapter.

Batches. One forward pass of a PEFT model has one active adapter (PEFT's per-sample
``adapter_names`` works in inference only), so a micro-batch is split by modality group
(:func:`split_by_group`) and each group runs as its own sub-batch with its own route; packed
rows only ever hold samples of one group. Every routing decision is counted
(:attr:`ModalityRouter.counts`), logged at debug level and returned with the model output.

Switching adapters with PEFT's public API (``set_adapter`` / ``disable_adapter``) also flips
``requires_grad`` of the adapter weights; :meth:`ModalityRouter.activate` restores the flags the
current stage declared (:mod:`mmtune.multimodal.stages`), so routing never changes what trains.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError, MMTuneError
from .groups import GROUPS, group_of, split_by_group  # noqa: F401 - defined with the data

log = logging.getLogger(__name__)

SPEECH_PROJECTOR = "audio_projector"  # the audio path's component names (modalities/audio.py)
VISION_SPEECH_PROJECTOR = "audio_projector_vs"


@dataclass(frozen=True)
class Route:
    """What a group of samples runs through: the LM adapter (None = base model, adapters
    disabled) and, when the group has audio, the projector its audio features take."""

    group: str
    adapter: str | None
    audio_projector: str | None

    def describe(self) -> str:
        proj = f", audio via {self.audio_projector}" if self.audio_projector else ""
        return f"{self.group} -> {self.adapter or 'base model'}{proj}"


class ModalityRouter:
    """Maps modality groups to routes; counts and logs every decision.

    ``table``: ``{group: adapter name or None}`` for every group of ``groups`` (the composed
    model passes the groups of its modalities, :func:`~mmtune.multimodal.groups.modality_groups`;
    default the four :data:`GROUPS`, see
    :meth:`mmtune.multimodal.config.MultimodalConfig.resolved_router`).
    ``vision_speech``: audio of image+audio samples goes through the second, vision-speech
    projector (Phi-4); otherwise through the speech projector.
    """

    def __init__(self, table: dict[str, str | None], vision_speech: bool = True,
                 groups: Sequence[str] = GROUPS):
        missing = [g for g in groups if g not in table]
        if missing:
            raise ConfigError(f"router table lacks groups {missing}; give all of {', '.join(groups)}")
        self.table = {g: table[g] for g in groups}
        self.table.update({g: a for g, a in table.items() if g not in self.table})
        self.vision_speech = vision_speech
        self.counts: Counter = Counter()  # (group, adapter) -> samples routed

    def adapters(self) -> set[str]:
        return {a for a in self.table.values() if a is not None}

    def route(self, group: str, n_samples: int = 1) -> Route:
        """The route of ``group``; counts ``n_samples`` decisions."""
        if group not in self.table:
            raise MMTuneError(f"unknown modality group '{group}'; groups: {', '.join(self.table)}")
        parts = group.split("+")
        proj = None
        if "audio" in parts:
            proj = VISION_SPEECH_PROJECTOR if (self.vision_speech and "image" in parts) else SPEECH_PROJECTOR
        r = Route(group, self.table[group], proj)
        self.counts[(group, r.adapter)] += n_samples
        log.debug("route %s (%d samples)", r.describe(), n_samples)
        return r

    def route_sample(self, n_images: int, n_audios: int) -> Route:
        return self.route(group_of(n_images, n_audios))

    def summary(self) -> str:
        """One line: samples per routing decision since the last :meth:`reset_counts`."""
        if not self.counts:
            return "router: no samples routed"
        parts = [f"{g} -> {a or 'base'}: {n}" for (g, a), n in sorted(self.counts.items(), key=lambda kv: list(self.table).index(kv[0][0]))]
        return "router: " + ", ".join(parts)

    def reset_counts(self) -> None:
        self.counts.clear()

    def to_dict(self) -> dict:
        return {"table": dict(self.table), "vision_speech": self.vision_speech}

    @classmethod
    def from_dict(cls, d: dict) -> ModalityRouter:
        return cls(d["table"], d.get("vision_speech", True), groups=tuple(d["table"]))

    @contextlib.contextmanager
    def activate(self, language_model: nn.Module, route: Route) -> Iterator[None]:
        """Run the LM with ``route.adapter`` active (None: adapters disabled) inside the block.

        Uses PEFT's ``set_adapter`` / ``disable_adapter`` and restores every ``requires_grad``
        flag PEFT changed, on entry (so the forward records gradients for exactly the stage's
        trainable set) and on exit; the previously active adapter is restored on exit. A
        model without adapters accepts only adapter-free routes.
        """
        if not hasattr(language_model, "peft_config"):
            if route.adapter is not None:
                raise MMTuneError(f"route {route.describe()} needs LoRA adapter '{route.adapter}' but the language "
                                  "model has no adapters; add it under multimodal.adapters")
            yield
            return
        if route.adapter is not None and route.adapter not in language_model.peft_config:
            raise MMTuneError(f"route {route.describe()}: the language model has no adapter '{route.adapter}' "
                              f"(it has {', '.join(sorted(language_model.peft_config))})")
        flags = [(p, p.requires_grad) for p in language_model.parameters()]
        previous = language_model.active_adapter

        def restore() -> None:
            for p, f in flags:
                if p.requires_grad != f:
                    p.requires_grad_(f)

        try:
            if route.adapter is None:
                with language_model.disable_adapter():
                    restore()
                    yield
            else:
                if previous != route.adapter:
                    language_model.set_adapter(route.adapter)
                restore()
                yield
        finally:
            if language_model.active_adapter != previous:
                language_model.set_adapter(previous)
            restore()
