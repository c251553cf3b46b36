"""The chat backend of composed multimodal models (an LLM with vision and/or audio encoders and
the modality router, :mod:`mmtune.multimodal.model`).

A directory holds a composed model when it (or its ``final/``) has ``mmtune_composed.json``
(:func:`mmtune.multimodal.run.find_composed`). Prompts are built as
:class:`mmtune.multimodal.chat.ComposedChatSession` builds them: each user turn's image and
audio tags go at the start of the turn (LLaVA style), the media of every turn stay in the
prompt, and placeholders are expanded to each image's / clip's feature-token count
(:func:`mmtune.multimodal.data.prompt_ids`). The router picks the adapter from the modality
group of all the media in the conversation; that choice is the reply's ``route``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.templates import get_template
from ..errors import MMTuneError
from ..multimodal.chat import load_composed_for_chat
from ..multimodal.data import Media, MediaCache, prompt_ids
from ..multimodal.model import AUDIO_TAG, IMAGE_TAG, find_composed
from ..multimodal.router import group_of
from .chat_backend import (
    BASE_MODEL,
    ChatBackend,
    InputError,
    Prompt,
    Turn,
    default_model_name,
    stream_decoded,
)


def is_composed_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` (or its ``final/``) holds a composed multimodal model."""
    if str(model_dir).startswith("builtin:") or not Path(str(model_dir)).is_dir():
        return False
    return find_composed(model_dir) is not None


def route_label(route) -> str:
    """What the UI shows for a router decision: the adapter's name, or "base model"."""
    return route.adapter or BASE_MODEL


class MultimodalBackend(ChatBackend):
    """A :class:`~mmtune.multimodal.model.ComposedModel` behind the :class:`ChatBackend` interface."""

    def __init__(self, model, template, name: str = "model", max_prompt_tokens: int | None = None):
        super().__init__()
        self.model, self.template, self.name = model, template, name
        self.max_prompt_tokens = max_prompt_tokens
        mods = {"text"}
        if model.vision_encoder is not None:
            mods.add("image")
        if model.audio_encoder is not None:
            mods.add("audio")
        self.modalities = frozenset(mods)
        config = getattr(model.language_model, "config", None)
        self.context_length = getattr(config, "max_position_embeddings", None)

    @classmethod
    def from_dir(cls, model_dir: str, template: str = "auto", name: str | None = None,
                 max_prompt_tokens: int | None = None) -> MultimodalBackend:
        model = load_composed_for_chat(model_dir)
        return cls(model, get_template(template, model.tokenizer), name or default_model_name(model_dir),
                   max_prompt_tokens)

    def default_route(self) -> str:
        return route_label(self.model.router.route(group_of(0, 0), n_samples=0))

    def _media(self, turns: Sequence[Turn]):
        """Chat messages with media tags, and every image and clip processed, in prompt order."""
        cache = MediaCache(self.model)
        messages, images, audios = [], [], []
        for i, t in enumerate(turns):
            content = t.text
            if t.role == "user" and (t.images or t.audios):
                content = f"{IMAGE_TAG}\n" * len(t.images) + f"{AUDIO_TAG}\n" * len(t.audios) + t.text
                for kind, paths, out in (("image", t.images, images), ("audio", t.audios, audios)):
                    for p in paths:
                        media = Media(kind, path=Path(p).expanduser().resolve(), field=f"messages[{i}]")
                        try:
                            out.append(cache.get(media))
                        except MMTuneError as e:
                            raise InputError(f"{kind} {Path(p).name}: {e}", f"messages[{i}].content",
                                             f"invalid_{kind}") from None
            messages.append({"role": t.role, "content": content})
        return messages, images, audios

    def prepare(self, turns: Sequence[Turn]) -> Prompt:
        messages, images, audios = self._media(turns)
        ids = prompt_ids(self.model, self.template, messages, images, audios)
        route = self.model.router.route(group_of(len(images), len(audios)), n_samples=0)
        return Prompt(list(ids), route_label(route), {"images": images, "audios": audios})

    def _start(self, prompt, settings, reply):
        tokens = self.model.stream_ids(prompt.ids, prompt.media["images"], prompt.media["audios"],
                                       settings.max_new_tokens, self.template.stop_token_ids, settings.temperature,
                                       settings.top_p, settings.seed)
        return stream_decoded(self.model.tokenizer, tokens, reply, settings.max_new_tokens, settings.stop)
