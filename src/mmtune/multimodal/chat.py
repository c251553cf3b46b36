"""Chat with a composed model: images and audio files beside the text (``mmtune chat --image/--audio``).

:class:`ComposedChatSession` keeps the conversation like :class:`mmtune.chat.ChatSession`; each
user turn may attach images and clips, whose tags are put at the start of the turn (LLaVA
style). Media of earlier turns stay in the prompt, so follow-up questions see them. The route
the router chose for the prompt (its modality group decides) is in :attr:`last_route`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import MMTuneError
from .model import AUDIO_TAG, IMAGE_TAG, ComposedModel, load_composed
from .router import Route, group_of


def load_composed_for_chat(directory: str | Path, dtype: str = "auto", device: str | None = None) -> ComposedModel:
    """A composed model for inference from its directory or a run's output directory (``final``)."""
    from .run import find_composed

    found = find_composed(directory)
    if found is None:
        raise MMTuneError(f"'{directory}' holds no composed model (no mmtune_composed.json in it or in its final/)")
    return load_composed(found, dtype=dtype, device=device, trainable=False)


class ComposedChatSession:
    """A conversation with a :class:`ComposedModel`.

    ``send(text, images=[paths], audios=[paths])`` returns an iterator of text pieces; the
    reply is recorded in the history once the iterator is consumed or closed.
    """

    def __init__(self, model: ComposedModel, template=None, system_prompt: str | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None):
        from ..data.templates import get_template

        self.model = model
        self.template = template if template is not None else get_template("auto", model.tokenizer)
        self.system_prompt = system_prompt
        self.temperature, self.top_p, self.max_new_tokens, self.seed = temperature, top_p, max_new_tokens, seed
        self.history: list[dict] = []
        self.images: list = []
        self.audios: list = []
        self.last_route: Route | None = None

    def reset(self) -> None:
        self.history.clear()
        self.images.clear()
        self.audios.clear()

    @property
    def adapter(self) -> str | None:
        """The adapter the router chose for the last prompt (None: the base model)."""
        return self.last_route.adapter if self.last_route else None

    def _media(self, paths: Sequence[str | Path], kind: str) -> list:
        from .data import Media, MediaCache

        cache = MediaCache(self.model)
        out = []
        for p in paths:
            path = Path(p).expanduser().resolve()
            out.append(cache.get(Media(kind, path=path, field=f"--{kind}")))
        return out

    def send(self, text: str, images: Sequence[str | Path] = (), audios: Sequence[str | Path] = ()) -> Iterator[str]:
        from .data import prompt_ids

        new_images, new_audios = self._media(images, "image"), self._media(audios, "audio")
        content = f"{IMAGE_TAG}\n" * len(new_images) + f"{AUDIO_TAG}\n" * len(new_audios) + text
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages += self.history + [{"role": "user", "content": content}]
        all_images, all_audios = self.images + new_images, self.audios + new_audios
        ids = prompt_ids(self.model, self.template, messages, all_images, all_audios)
        limit = getattr(getattr(self.model.language_model, "config", None), "max_position_embeddings", None)
        if limit is not None and len(ids) + self.max_new_tokens > limit:
            raise MMTuneError(f"the prompt has {len(ids)} tokens (images and audio included); with "
                              f"{self.max_new_tokens} for the reply it exceeds the model's context of {limit}; "
                              "/reset the conversation or use fewer crops")
        self.history.append({"role": "user", "content": content})
        self.images, self.audios = all_images, all_audios
        self.last_route = self.model.router.route(group_of(len(all_images), len(all_audios)), n_samples=0)
        return self._stream(ids)

    def _stream(self, ids: list[int]) -> Iterator[str]:
        tok = self.model.tokenizer
        out: list[int] = []
        shown = ""
        try:
            for t in self.model.stream_ids(ids, self.images, self.audios, self.max_new_tokens,
                                           self.template.stop_token_ids, self.temperature, self.top_p, self.seed):
                out.append(t)
                text = tok.decode(out, skip_special_tokens=True)
                if text.endswith("\ufffd") or len(text) <= len(shown):
                    continue
                yield text[len(shown):]
                shown = text
        finally:
            self.history.append({"role": "assistant", "content": tok.decode(out, skip_special_tokens=True)})
