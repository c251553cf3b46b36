"""The chat-backend interface the web UI and the OpenAI-compatible server talk to: conversation
turns, generation settings, prompts, streamed replies and :class:`ChatBackend` itself.

The implementations are :class:`mmtune.serve.backend.TextBackend` and
:class:`mmtune.serve.multimodal_backend.MultimodalBackend`; :func:`mmtune.serve.backend.load_backend`
picks one for a model directory. This module holds what both share, so neither imports the other.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MMTuneError

#: File suffixes the UI sorts uploads by (the OpenAI server gets explicit content-part types).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".webm")

#: The encoder a model needs for each input modality (used in error messages and notes).
ENCODER_NAMES = {"image": "vision encoder", "audio": "audio encoder"}

#: Label shown when no adapter is active.
BASE_MODEL = "base model"


@dataclass
class Turn:
    """One message of a conversation. ``images``/``audios`` are local file paths."""

    role: str  # system | user | assistant
    text: str = ""
    images: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)

    def as_message(self) -> dict:
        """The ``{"role", "content"}`` dict chat templates take (text only)."""
        return {"role": self.role, "content": self.text}


@dataclass
class GenerationSettings:
    """Sampling settings of one reply (see :func:`mmtune.generate.iter_token_ids`)."""

    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the reply ends before the first occurrence of any of these


@dataclass
class Prompt:
    """A conversation rendered for one backend: its token ids, the adapter that will answer,
    and whatever else the backend's generation needs (processed images and clips)."""

    ids: list[int]
    route: str = BASE_MODEL
    media: dict = field(default_factory=dict)


class InputError(MMTuneError):
    """A conversation a backend cannot serve as given (too long, an unsupported modality).

    ``param`` names the offending request field and ``code`` is a stable key; the OpenAI
    server returns both in its error JSON.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class Reply:
    """A reply being generated: iterate it for text pieces.

    Once the iteration ends (or :meth:`close` is called), ``finish_reason`` is ``"stop"``
    (end-of-turn token or a stop string) or ``"length"`` (``max_new_tokens`` reached) and
    ``completion_tokens`` counts the generated tokens. ``route`` is the adapter that answers
    (the router's choice for a composed model, else the loaded adapter or ``"base model"``);
    ``notes`` are remarks for the user, e.g. that an attached image could not be seen.
    """

    def __init__(self, prompt_tokens: int, route: str, notes: Sequence[str] = ()):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.route = route
        self.notes = list(notes)
        self._pieces: Iterator[str] | None = None

    def attach(self, pieces: Iterator[str]) -> Reply:
        self._pieces = pieces
        return self

    def __iter__(self) -> Iterator[str]:
        if self._pieces is None:
            raise RuntimeError("Reply has no generator attached")
        return self._pieces

    def text(self) -> str:
        """Consume the whole reply."""
        return "".join(self)

    def close(self) -> None:
        """Stop generating (the lock is released; what was generated so far counts)."""
        if self._pieces is not None and hasattr(self._pieces, "close"):
            self._pieces.close()


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string, and so
    must not be shown yet."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stream_decoded(tokenizer, token_ids: Iterator[int], reply: Reply, max_new_tokens: int,
                   stops: Sequence[str] = ()) -> Iterator[str]:
    """Decode generated token ids into text pieces, as :func:`mmtune.generate.generate_stream`
    does (the whole reply re-decoded after each token, a piece that ends inside a multi-byte
    character waits for the next token), and in addition count tokens into ``reply``, set its
    ``finish_reason`` and end the reply before the first stop string (a piece that might be
    the start of one is held back until it is known not to be).

    With no stop strings the pieces join to ``generate_text``'s output for the same tokens
    (tested)."""
    ids: list[int] = []
    text, shown = "", 0
    try:
        for tok in token_ids:
            ids.append(tok)
            reply.completion_tokens = len(ids)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut = first_stop(text, stops)
            if cut is not None:
                reply.finish_reason = "stop"
                if cut > shown:
                    yield text[shown:cut]
                return
            if text.endswith("\ufffd"):
                continue
            end = len(text) - held_back(text, stops)
            if end > shown:
                yield text[shown:end]
                shown = end
        reply.finish_reason = "length" if len(ids) >= max_new_tokens else "stop"
        if len(text) > shown:
            yield text[shown:]
    finally:
        if reply.finish_reason is None:  # closed early by the caller
            reply.finish_reason = "stop"
        close = getattr(token_ids, "close", None)
        if close is not None:
            close()


def _locked(lock: threading.Lock, pieces: Iterator[str]) -> Iterator[str]:
    """``pieces`` generated while holding ``lock`` (taken at the first ``next``, released when the
    stream ends or is closed)."""
    with lock:
        try:
            yield from pieces
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()


class ChatBackend(abc.ABC):
    """What the server and the UI talk to.

    Subclasses set ``modalities`` (a subset of ``{"text", "image", "audio"}``) and implement
    :meth:`prepare` and :meth:`_start`.
    """

    name: str = "model"
    modalities: frozenset[str] = frozenset({"text"})
    context_length: int | None = None
    max_prompt_tokens: int | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # -- what subclasses provide ---------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, turns: Sequence[Turn]) -> Prompt:
        """Render ``turns`` (attachments already filtered to :attr:`modalities`) into a prompt.
        Unreadable attachments raise :class:`InputError`."""

    @abc.abstractmethod
    def _start(self, prompt: Prompt, settings: GenerationSettings, reply: Reply) -> Iterator[str]:
        """The reply's text pieces (called with inputs already checked)."""

    def default_route(self) -> str:
        """The adapter that answers a text-only conversation."""
        return BASE_MODEL

    def describe(self) -> dict:
        """Facts shown to the user: name, modalities, context length, the text route's adapter."""
        return {"name": self.name, "modalities": sorted(self.modalities), "context_length": self.context_length,
                "adapter": self.default_route()}

    # -- shared --------------------------------------------------------------------------------
    @property
    def prompt_limit(self) -> int | None:
        """The longest prompt accepted: ``max_prompt_tokens`` and one token short of the context."""
        limits = [x for x in (self.max_prompt_tokens,
                              None if self.context_length is None else self.context_length - 1) if x is not None]
        return min(limits) if limits else None

    def unsupported(self, turns: Sequence[Turn]) -> dict[str, list[str]]:
        """Attachments of ``turns`` this model has no encoder for: ``{"image": [paths], ...}``."""
        out: dict[str, list[str]] = {}
        for t in turns:
            for kind, paths in (("image", t.images), ("audio", t.audios)):
                if paths and kind not in self.modalities:
                    out.setdefault(kind, []).extend(paths)
        return out

    def start(self, turns: Sequence[Turn], settings: GenerationSettings, strict: bool = True) -> Reply:
        """Check the conversation and start the reply (generation runs as it is iterated).

        Attachments the model has no encoder for raise :class:`InputError` when ``strict`` (the
        server); otherwise (the UI) they are left out and the reply carries a note saying so.
        A prompt longer than :attr:`prompt_limit` raises :class:`InputError`; ``max_new_tokens``
        is cut to what fits in the context (the reply then ends with ``finish_reason="length"``).
        """
        turns = list(turns)
        if not turns:
            raise InputError("the conversation is empty: send at least one message", "messages", "empty_messages")
        notes = []
        for kind, paths in self.unsupported(turns).items():
            enc = ENCODER_NAMES[kind]
            if strict:
                raise InputError(f"model '{self.name}' has no {enc}: it cannot take {kind} inputs. Send text only, "
                                 f"or serve a composed multimodal model that has a {enc}.", "messages",
                                 f"unsupported_{kind}")
            names = ", ".join(Path(p).name for p in paths)
            notes.append(f"This model has no {enc}, so the {kind} ({names}) was not seen: the reply is based on "
                         "the text only. Load a composed multimodal model to ask about images and audio.")
        turns = [Turn(t.role, t.text, [p for p in t.images if "image" in self.modalities],
                      [p for p in t.audios if "audio" in self.modalities]) for t in turns]
        prompt = self.prepare(turns)
        n = len(prompt.ids)
        limit = self.prompt_limit
        if limit is not None and n > limit:
            raise InputError(f"the prompt is {n} tokens long, over this model's limit of {limit} tokens "
                             f"(context {self.context_length}): shorten or drop earlier messages.",
                             "messages", "context_length_exceeded")
        if settings.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1", "max_tokens", "invalid_value")
        if self.context_length is not None:
            fit = self.context_length - n
            if settings.max_new_tokens > fit:
                settings = GenerationSettings(fit, settings.temperature, settings.top_p, settings.seed, settings.stop)
        reply = Reply(n, prompt.route, notes)
        return reply.attach(_locked(self._lock, self._start(prompt, settings, reply)))

    def count_prompt_tokens(self, turns: Sequence[Turn]) -> int:
        return len(self.prepare(turns).ids)


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


def split_attachments(paths: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Sort uploaded files by suffix into (images, audios, others)."""
    images, audios, others = [], [], []
    for p in paths:
        suffix = Path(p).suffix.lower()
        (images if suffix in IMAGE_SUFFIXES else audios if suffix in AUDIO_SUFFIXES else others).append(p)
    return images, audios, others
