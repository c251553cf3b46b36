"""Multi-turn chat with a (fine-tuned) model: a session object and a terminal REPL.

A chat template is any object with ``render_prompt(messages) -> list[int]`` (the prompt
token ids, generation prompt included) and ``stop_token_ids: list[int]``; the chat templates
of :mod:`mmtune.data.templates` are such objects. Without one, ``get_template("auto")`` is used
(the tokenizer's own ``chat_template``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from .errors import MMTuneError
from .generate import generate_stream
from .models.trained import load_for_chat  # noqa: F401 - the loader, kept importable from here


class ChatTemplate(Protocol):
    """What a chat session needs from a template (``mmtune.data.templates.ChatTemplate`` is one)."""

    stop_token_ids: list[int]

    def render_prompt(self, messages: list[dict]) -> list[int]: ...


class ChatSession:
    """Conversation state: an optional system prompt and alternating user/assistant turns.

    ``send`` streams the reply and records it in the history once the stream is consumed (or
    closed early: the part generated so far is kept). When the prompt no longer fits the
    model's context with room for ``max_new_tokens``, the oldest turns are dropped.
    """

    def __init__(self, model, tokenizer, template: ChatTemplate | None = None, system_prompt: str | None = None,
                 temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 256, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        if template is None:
            from .data.templates import get_template

            template = get_template("auto", tokenizer)
        self.template = template
        self.system_prompt = system_prompt
        self.temperature, self.top_p, self.max_new_tokens, self.seed = temperature, top_p, max_new_tokens, seed
        self.history: list[dict] = []
        self.context_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def messages(self) -> list[dict]:
        """The conversation as chat messages: the system prompt (if any), then the turns."""
        return self._system() + list(self.history)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt and start a new conversation."""
        self.system_prompt = text or None
        self.reset()

    def _prompt_ids(self) -> list[int]:
        system = self._system()
        history = list(self.history)
        budget = None if self.context_length is None else self.context_length - self.max_new_tokens
        ids = self.template.render_prompt(system + history)
        while budget is not None and len(ids) > budget and len(history) > 1:
            history = history[2:]  # drop the oldest exchange (user + assistant)
            ids = self.template.render_prompt(system + history)
        if budget is not None and len(ids) > budget:
            raise MMTuneError(f"the message is too long: the prompt has {len(ids)} tokens, the model's context "
                              f"is {self.context_length} and {self.max_new_tokens} are kept for the reply")
        self.history[:] = history
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces."""
        self.history.append({"role": "user", "content": text})
        try:
            prompt = self._prompt_ids()
        except MMTuneError:
            self.history.pop()
            raise
        return self._stream(prompt)

    def _stream(self, prompt: list[int]) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in generate_stream(self.model, self.tokenizer, prompt, self.max_new_tokens, self.temperature,
                                         self.top_p, self.template.stop_token_ids, self.seed):
                pieces.append(piece)
                yield piece
        finally:
            self.history.append({"role": "assistant", "content": "".join(pieces)})


HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit"


def run_terminal_chat(session: ChatSession, input_fn: Callable[[str], str] = input,
                      print_fn: Callable[..., None] = print) -> None:
    """A read-eval-print loop over ``session``; replies are printed as they stream.

    ``/reset`` clears the conversation, ``/system TEXT`` sets the system prompt (and resets),
    ``/exit`` (or end of input, Ctrl-D / Ctrl-C) ends. ``print_fn`` is called like ``print``.
    """
    print_fn(HELP)
    while True:
        try:
            line = input_fn("user> ")
        except (EOFError, KeyboardInterrupt):
            print_fn()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                session.reset()
                print_fn("[conversation reset]")
            elif cmd == "/system":
                session.set_system(arg.strip())
                print_fn(f"[system prompt {'set' if arg.strip() else 'cleared'}; conversation reset]")
            else:
                print_fn(f"unknown command {cmd}; {HELP}")
            continue
        print_fn("assistant> ", end="", flush=True)
        try:
            for piece in session.send(text):
                print_fn(piece, end="", flush=True)
        except MMTuneError as e:
            print_fn(f"[{e}]", end="")
        except KeyboardInterrupt:
            print_fn(" [interrupted]", end="")
        print_fn()
