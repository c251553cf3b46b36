"""Chat backends: a conversation (text turns, optionally with image and audio files) in, a
streamed reply out.

The web UI and the OpenAI-compatible server both talk to a :class:`ChatBackend`, so what a
model accepts, how its prompt is built and how long it may be are decided in one place:

- :class:`TextBackend`: a causal LM (base, merged, base + LoRA adapter, or a training
  checkpoint), loaded with :func:`mmtune.evaluation.load_model_and_template`, so the prompt is
  rendered with the chat template the model was trained with (the name a run records in its
  checkpoint's ``meta.json``), and generation stops at that template's end-of-turn tokens.
- :class:`MultimodalBackend`: a composed model (an LLM with vision and/or audio encoders and
  the modality router), used when the model directory holds a composed model.

Backends are stateless: every call gets the whole conversation (as the OpenAI API does), and
a call holds the backend's lock while it generates, so concurrent requests run one after the
other instead of competing for the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import MMTuneError
from .chat_backend import (  # noqa: F401 - the interface, importable from here as before
    AUDIO_SUFFIXES,
    BASE_MODEL,
    ENCODER_NAMES,
    IMAGE_SUFFIXES,
    ChatBackend,
    GenerationSettings,
    InputError,
    Prompt,
    Reply,
    Turn,
    default_model_name,
    first_stop,
    held_back,
    split_attachments,
    stream_decoded,
)


class TextBackend(ChatBackend):
    """A causal LM with its training chat template.

    ``template`` is any object with ``prompt_ids(messages) -> list[int]`` and
    ``stop_token_ids`` (:class:`mmtune.data.templates.ChatTemplate`).
    """

    modalities = frozenset({"text"})

    def __init__(self, model, tokenizer, template, name: str = "model", adapter_label: str | None = None,
                 max_prompt_tokens: int | None = None):
        super().__init__()
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.name = name
        self.adapter_label = adapter_label
        self.max_prompt_tokens = max_prompt_tokens
        self.context_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    @classmethod
    def from_dir(cls, model_dir: str, adapter: str | None = None, template: str = "auto", name: str | None = None,
                 max_prompt_tokens: int | None = None) -> TextBackend:
        from ..evaluation import load_model_and_template

        model, tokenizer, tpl = load_model_and_template(str(model_dir), adapter, template)
        label = None
        if hasattr(model, "peft_config"):  # a PEFT model: a LoRA adapter is active
            label = f"LoRA adapter {default_model_name(model_dir, adapter)}"
        return cls(model, tokenizer, tpl, name or default_model_name(model_dir, adapter), label, max_prompt_tokens)

    def default_route(self) -> str:
        return self.adapter_label or BASE_MODEL

    def prepare(self, turns: Sequence[Turn]) -> Prompt:
        return Prompt(list(self.template.prompt_ids([t.as_message() for t in turns])), self.default_route())

    def _start(self, prompt, settings, reply):
        from ..generate import iter_token_ids

        tokens = iter_token_ids(self.model, prompt.ids, settings.max_new_tokens, settings.temperature,
                                settings.top_p, self.template.stop_token_ids, settings.seed)
        return stream_decoded(self.tokenizer, tokens, reply, settings.max_new_tokens, settings.stop)


def is_composed_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` (or its ``final/``) holds a composed multimodal model (see
    :class:`~mmtune.serve.multimodal_backend.MultimodalBackend`)."""
    if str(model_dir).startswith("builtin:") or not Path(str(model_dir)).is_dir():
        return False
    from ..multimodal.model import find_composed

    return find_composed(model_dir) is not None


def load_backend(model_dir: str, adapter: str | None = None, template: str = "auto", name: str | None = None,
                 max_prompt_tokens: int | None = None, log: Callable[[str], None] | None = None) -> ChatBackend:
    """The backend for ``model_dir``: multimodal for a composed model, else text."""
    if is_composed_model(model_dir):
        from .multimodal_backend import MultimodalBackend

        if adapter:
            raise MMTuneError(f"{model_dir} is a composed multimodal model: its adapters are chosen by its router, "
                              "so --adapter cannot be given")
        return MultimodalBackend.from_dir(model_dir, template, name=name, max_prompt_tokens=max_prompt_tokens)
    return TextBackend.from_dir(model_dir, adapter, template, name, max_prompt_tokens)
