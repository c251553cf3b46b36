"""Models a chat session talks to: what each accepts, how a conversation becomes its prompt,
and loading one from a directory.

- :class:`TextChatModel`: a causal LM (base, merged, base + LoRA adapter, or a training
  checkpoint), loaded with :func:`mmtune.evaluation.load_model_and_template`, so the prompt is
  rendered with the chat template the model was trained with (the name a run records in its
  checkpoint's ``meta.json``) and generation stops at that template's end-of-turn tokens.
- :class:`ComposedChatModel`: a composed model (an LLM with vision and/or audio encoders and
  the modality router). Each user turn's image and audio tags go at the start of the turn
  (LLaVA style), the media of every kept turn stay in the prompt, placeholders are expanded to
  each image's / clip's feature-token count (:func:`mmtune.multimodal.data.prompt_ids`), and the
  router picks the adapter from the modality group of all the media in the prompt.

Both generate with :func:`mmtune.inference.generate.iter_token_ids`. A model has one lock:
replies are generated one at a time (:class:`~mmtune.inference.session.ChatSession` takes it).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..data.templates import get_template
from ..errors import MMTuneError
from ..evaluation import load_model_and_template
from ..multimodal.data import Media, MediaCache, prompt_ids
from ..multimodal.groups import AUDIO_TAG, IMAGE_TAG, group_of
from ..multimodal.model import ComposedModel, find_composed, load_composed
from .generate import iter_token_ids
from .turns import BASE_MODEL, InputError, Prompt, Turn, media_name


class ChatModel(abc.ABC):
    """A model behind a chat session. Subclasses set ``modalities`` (a subset of ``{"text",
    "image", "audio"}``), ``model`` (what :func:`iter_token_ids` runs), ``tokenizer`` and
    ``template``, and implement :meth:`prepare`."""

    name: str = "model"
    modalities: frozenset[str] = frozenset({"text"})
    context_length: int | None = None
    max_prompt_tokens: int | None = None
    #: What the context error suggests doing.
    too_long_hint = "shorten it"

    def __init__(self) -> None:
        self.lock = threading.Lock()

    @abc.abstractmethod
    def prepare(self, turns: Sequence[Turn], cache=None) -> Prompt:
        """Render ``turns`` (attachments already filtered to :attr:`modalities`) into a prompt;
        ``cache`` is :meth:`new_cache`'s (reused while the context policy re-renders).
        Unreadable attachments raise :class:`InputError`."""

    def new_cache(self):
        """A cache of processed media for one reply (None: nothing to cache)."""
        return None

    def tokens(self, prompt: Prompt, settings) -> Iterator[int]:
        """The reply's token ids (``settings``: a GenerationSettings)."""
        return iter_token_ids(self.model, prompt.ids, settings.max_new_tokens, settings.temperature, settings.top_p,
                              self.template.stop_token_ids, settings.seed, top_k=settings.top_k,
                              images=prompt.images, audios=prompt.audios)

    def default_route(self) -> str:
        """The adapter that answers a text-only conversation."""
        return BASE_MODEL

    def describe(self) -> dict:
        """Facts shown to the user: name, modalities, context length, the text route's adapter."""
        return {"name": self.name, "modalities": sorted(self.modalities), "context_length": self.context_length,
                "adapter": self.default_route()}

    def unsupported(self, turns: Sequence[Turn]) -> dict[str, list]:
        """Attachments of ``turns`` this model has no encoder for: ``{"image": [items], ...}``."""
        out: dict[str, list] = {}
        for t in turns:
            for kind, items in (("image", t.images), ("audio", t.audios)):
                if items and kind not in self.modalities:
                    out.setdefault(kind, []).extend(items)
        return out

    def count_prompt_tokens(self, turns: Sequence[Turn]) -> int:
        return len(self.prepare(turns).ids)


def _context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


class TextChatModel(ChatModel):
    """A causal LM with its chat template (``template``: any object with ``prompt_ids(messages)
    -> list[int]`` and ``stop_token_ids``, :class:`mmtune.data.templates.ChatTemplate`; default:
    the tokenizer's own ``chat_template``)."""

    modalities = frozenset({"text"})

    def __init__(self, model, tokenizer, template=None, name: str = "model", adapter_label: str | None = None,
                 max_prompt_tokens: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.template = template if template is not None else get_template("auto", tokenizer)
        self.name, self.adapter_label, self.max_prompt_tokens = name, adapter_label, max_prompt_tokens
        self.context_length = _context_length(model)

    @classmethod
    def from_dir(cls, model_dir: str, adapter: str | None = None, template: str = "auto", name: str | None = None,
                 max_prompt_tokens: int | None = None) -> TextChatModel:

        model, tokenizer, tpl = load_model_and_template(str(model_dir), adapter, template)
        label = None
        if hasattr(model, "peft_config"):  # a PEFT model: a LoRA adapter is active
            label = f"LoRA adapter {default_model_name(model_dir, adapter)}"
        return cls(model, tokenizer, tpl, name or default_model_name(model_dir, adapter), label, max_prompt_tokens)

    def default_route(self) -> str:
        return self.adapter_label or BASE_MODEL

    def prepare(self, turns: Sequence[Turn], cache=None) -> Prompt:
        return Prompt(list(self.template.prompt_ids([t.as_message() for t in turns])), self.default_route())


def route_label(route) -> str:
    """What is shown for a router decision: the adapter's name, or "base model"."""
    return route.adapter or BASE_MODEL


class ComposedChatModel(ChatModel):
    """A :class:`~mmtune.multimodal.model.ComposedModel` behind the :class:`ChatModel` interface."""

    too_long_hint = "shorten it, or send fewer images / smaller ones (fewer crops)"

    def __init__(self, model: ComposedModel, template=None, name: str = "model", max_prompt_tokens: int | None = None):
        super().__init__()
        self.model, self.tokenizer, self.name = model, model.tokenizer, name
        self.template = template if template is not None else get_template("auto", model.tokenizer)
        self.max_prompt_tokens = max_prompt_tokens
        mods = {"text"}
        if model.vision_encoder is not None:
            mods.add("image")
        if model.audio_encoder is not None:
            mods.add("audio")
        self.modalities = frozenset(mods)
        self.context_length = _context_length(model.language_model)

    @classmethod
    def from_dir(cls, model_dir: str, template: str = "auto", name: str | None = None,
                 max_prompt_tokens: int | None = None) -> ComposedChatModel:
        model = load_composed_for_chat(model_dir)
        return cls(model, get_template(template, model.tokenizer), name or default_model_name(model_dir),
                   max_prompt_tokens)

    def default_route(self) -> str:
        return route_label(self.model.router.route(group_of(0, 0), n_samples=0))

    def new_cache(self) -> MediaCache:
        return MediaCache(self.model)

    def prepare(self, turns: Sequence[Turn], cache: MediaCache | None = None) -> Prompt:
        cache = cache if cache is not None else self.new_cache()
        messages, images, audios = [], [], []
        for i, t in enumerate(turns):
            content = t.text
            if t.role == "user" and (t.images or t.audios):
                content = f"{IMAGE_TAG}\n" * len(t.images) + f"{AUDIO_TAG}\n" * len(t.audios) + t.text
                for kind, items, out in (("image", t.images, images), ("audio", t.audios, audios)):
                    for item in items:
                        media = item if isinstance(item, Media) else \
                            Media(kind, path=Path(item).expanduser().resolve(), field=f"messages[{i}]")
                        try:
                            out.append(cache.get(media))
                        except MMTuneError as e:
                            raise InputError(f"{kind} {media_name(item)}: {e}", f"messages[{i}].content",
                                             f"invalid_{kind}") from None
            messages.append({"role": t.role, "content": content})
        ids = prompt_ids(self.model, self.template, messages, images, audios)
        group = group_of(len(images), len(audios))
        return Prompt(list(ids), route_label(self.model.router.route(group, n_samples=0)), images, audios, group)


def default_model_name(model_dir: str, adapter: str | None = None) -> str:
    """A short id for a model: the directory name, with its run name for checkpoints
    (``runs/quickstart/final`` -> ``quickstart/final``); ``builtin:tiny`` stays as it is."""
    src = str(adapter or model_dir).rstrip("/")
    if src.startswith("builtin:"):
        return src
    p = Path(src)
    if p.name == "final":
        return f"{p.parent.name}/{p.name}"
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    return p.name or src


def is_composed_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` (or its ``final/``) holds a composed multimodal model."""
    if str(model_dir).startswith("builtin:") or not Path(str(model_dir)).is_dir():
        return False
    return find_composed(model_dir) is not None


def load_composed_for_chat(directory: str | Path, dtype: str = "auto", device: str | None = None) -> ComposedModel:
    """A composed model for inference from its directory or a run's output directory (``final``)."""
    found = find_composed(directory)
    if found is None:
        raise MMTuneError(f"'{directory}' holds no composed model (no mmtune_composed.json in it or in its final/)")
    return load_composed(found, dtype=dtype, device=device, trainable=False)


def load_chat_model(model_dir: str, adapter: str | None = None, template: str = "auto", name: str | None = None,
                    max_prompt_tokens: int | None = None) -> ChatModel:
    """The chat model in ``model_dir``: composed for a composed model directory, else text."""
    if is_composed_model(model_dir):
        if adapter:
            raise MMTuneError(f"{model_dir} is a composed multimodal model: its adapters are chosen by its router, "
                              "so --adapter cannot be given")
        return ComposedChatModel.from_dir(model_dir, template, name=name, max_prompt_tokens=max_prompt_tokens)
    return TextChatModel.from_dir(model_dir, adapter, template, name, max_prompt_tokens)
