"""The one chat session: a conversation with a :class:`~mmtune.inference.models.ChatModel`,
used by terminal chat (stateful, turn by turn), the web UI and the OpenAI-compatible server
(a session built from the whole conversation of each request, as the OpenAI API sends it).

A reply is started by :meth:`ChatSession.respond` (or :meth:`ChatSession.send`, which first
adds a user turn) and generated as the returned :class:`Reply` is iterated:

- attachments the model has no encoder for raise :class:`InputError` when ``strict`` (the
  server); otherwise (terminal, web UI) they are left out and the reply carries a note;
- a conversation longer than the context follows :mod:`mmtune.inference.context`: the oldest
  exchanges are dropped (from the session's history too, with a note on the reply), and the
  reply is cut to what fits;
- the reply holds the model's lock while it generates, so concurrent replies run one after
  the other; once it is consumed or closed, the text shown is recorded as the assistant turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from .context import Limits, fit, leading_system
from .generate import stream_text
from .models import ChatModel
from .turns import ENCODER_NAMES, GenerationSettings, InputError, Turn, media_name


class Reply:
    """A reply being generated: iterate it for text pieces.

    Once the iteration ends (or :meth:`close` is called), ``finish_reason`` is ``"stop"``
    (end-of-turn token or a stop string) or ``"length"`` (``max_new_tokens`` reached) and
    ``completion_tokens`` counts the generated tokens. ``route`` is the adapter that answers
    (the router's choice for a composed model, else the loaded adapter or "base model"),
    ``group`` the modality group of the prompt's media; ``dropped`` counts the oldest turns
    left out to fit the context; ``notes`` are remarks for the user (an attachment that could
    not be seen, dropped turns).
    """

    def __init__(self, prompt_tokens: int, route: str, notes: Sequence[str] = (), dropped: int = 0,
                 group: str = "text"):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.route, self.group, self.dropped = route, group, dropped
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


def _locked(lock, pieces: Iterator[str]) -> Iterator[str]:
    """``pieces`` generated while holding ``lock`` (taken at the first ``next``, released when the
    stream ends or is closed)."""
    with lock:
        try:
            yield from pieces
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()


class ChatSession:
    """Conversation state: an optional system prompt and the turns (``history``, :class:`Turn`
    objects; images and audio attached to user turns), and the generation settings.

    ``history`` may start with system turns of its own (a server request's); ``system_prompt``
    goes before all of them.
    """

    def __init__(self, model: ChatModel, history: Sequence[Turn] = (), system_prompt: str | None = None,
                 settings: GenerationSettings | None = None):
        self.model = model
        self.history: list[Turn] = list(history)
        self.system_prompt = system_prompt or None
        self.settings = settings if settings is not None else GenerationSettings()

    def turns(self) -> list[Turn]:
        """The conversation: the system prompt (if any), then the history."""
        return ([Turn("system", self.system_prompt)] if self.system_prompt else []) + list(self.history)

    def messages(self) -> list[dict]:
        """The conversation as ``{"role", "content"}`` chat messages."""
        return [t.as_message() for t in self.turns()]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt and start a new conversation."""
        self.system_prompt = text or None
        self.reset()

    def send(self, text: str, images: Sequence = (), audios: Sequence = (), settings: GenerationSettings | None = None,
             strict: bool = False) -> Reply:
        """Add a user message (with attachments) and start the reply. A message that cannot be
        answered (:class:`InputError`) is not kept."""
        self.history.append(Turn("user", text, list(images), list(audios)))
        try:
            return self.respond(settings, strict)
        except BaseException:
            self.history.pop()
            raise

    def respond(self, settings: GenerationSettings | None = None, strict: bool = False) -> Reply:
        """Check the conversation and start the next assistant reply (generation runs as the
        reply is iterated). ``settings`` default to the session's."""
        settings = settings if settings is not None else self.settings
        model = self.model
        turns = self.turns()
        if not turns:
            raise InputError("the conversation is empty: send at least one message", "messages", "empty_messages")
        if settings.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1", "max_tokens", "invalid_value")
        notes = []
        for kind, items in model.unsupported(turns).items():
            enc = ENCODER_NAMES[kind]
            if strict:
                raise InputError(f"model '{model.name}' has no {enc}: it cannot take {kind} inputs. Send text only, "
                                 f"or serve a composed multimodal model that has a {enc}.", "messages",
                                 f"unsupported_{kind}")
            names = ", ".join(media_name(p) for p in items)
            notes.append(f"This model has no {enc}, so the {kind} ({names}) was not seen: the reply is based on "
                         "the text only. Load a composed multimodal model to ask about images and audio.")
        turns = [Turn(t.role, t.text, [p for p in t.images if "image" in model.modalities],
                      [p for p in t.audios if "audio" in model.modalities]) for t in turns]
        cache = model.new_cache()
        limits = Limits.of(model.context_length, settings.max_new_tokens, model.max_prompt_tokens)
        fitted = fit(turns, lambda ts: model.prepare(ts, cache), limits, model.context_length, model.too_long_hint)
        prompt, n = fitted.prompt, len(fitted.prompt.ids)
        if fitted.dropped:
            start = leading_system(turns) - (1 if self.system_prompt else 0)  # the first droppable history turn
            del self.history[start:start + fitted.dropped]
            notes.append(f"The {fitted.dropped} oldest messages were left out to fit the model's context.")
        if model.context_length is not None and settings.max_new_tokens > model.context_length - n:
            settings = replace(settings, max_new_tokens=model.context_length - n)
        reply = Reply(n, prompt.route, notes, fitted.dropped, prompt.group)
        pieces = stream_text(model.tokenizer, model.tokens(prompt, settings), settings.stop, settings.max_new_tokens,
                             reply)
        return reply.attach(self._record(_locked(model.lock, pieces)))

    def _record(self, pieces: Iterator[str]) -> Iterator[str]:
        shown: list[str] = []
        try:
            for piece in pieces:
                shown.append(piece)
                yield piece
        finally:
            pieces.close()
            self.history.append(Turn("assistant", "".join(shown)))


def respond(model: ChatModel, turns: Sequence[Turn], settings: GenerationSettings | None = None,
            strict: bool = True) -> Reply:
    """One reply to a whole conversation (the server's and the web UI's call): a
    :class:`ChatSession` over ``turns``."""
    return ChatSession(model, turns).respond(settings, strict)
