"""Multi-turn chat with a (fine-tuned) model: a session object and a terminal REPL.

A chat template is any object with ``render_prompt(messages) -> list[int]`` (the prompt
token ids, generation prompt included) and ``stop_token_ids: list[int]``; the chat templates
of :mod:`mmtune.data.templates` are such objects. Without one, ``get_template("auto")`` is used
(the tokenizer's own ``chat_template``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from .errors import MMTuneError
from .export import find_checkpoint, read_meta
from .generate import generate_stream


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


def load_for_chat(model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: str = "auto",
                  device: str | None = None):
    """Load ``(model, tokenizer)`` for inference from any of:

    - a base or merged model directory (or ``builtin:tiny``), optionally with ``adapter_dir``
      (an adapter directory, a trainer checkpoint or a run output directory);
    - a trainer checkpoint or run output directory (its LoRA applied to ``meta.json``'s base,
      or its full model);
    - an exported adapter directory (its base from ``base_model_name_or_path``).

    The tokenizer comes from the checkpoint/adapter directory when it has one (it may have
    gained tokens in training), else from the model directory. The model is in eval mode on
    ``device`` (default: CUDA if available, else CPU) in ``dtype`` (see ``model.dtype``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .models.loading import load_tokenizer, resolve_dtype, resolve_model_path, set_offline

    base, adapter, tok_dir = _chat_sources(model_dir, adapter_dir)
    base = resolve_model_path(base)
    set_offline()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(dtype), local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer = load_tokenizer(tok_dir or base)
    return model, tokenizer


def _checkpoint_sources(ckpt: Path, base_override=None):
    meta = read_meta(ckpt)
    tok = ckpt / "tokenizer" if (ckpt / "tokenizer" / "tokenizer_config.json").is_file() else None
    if meta["adapter"] == "none":
        return ckpt / "model", None, tok
    return base_override or meta["base_model"], ckpt / "model", tok


def _adapter_sources(d: Path, base_override=None):
    cfg_path = d / "adapter_config.json"
    base = base_override or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise MMTuneError(f"{cfg_path} has no base_model_name_or_path: give the base model directory")
    return base, d, d if (d / "tokenizer_config.json").is_file() else None


def _chat_sources(model_dir, adapter_dir):
    """(base model path, adapter dir or None, tokenizer dir or None) for :func:`load_for_chat`."""
    p = Path(str(model_dir))
    if adapter_dir is None:
        ckpt = find_checkpoint(p) if p.is_dir() else None
        if ckpt is not None:
            return _checkpoint_sources(ckpt)
        if (p / "adapter_config.json").is_file():
            return _adapter_sources(p)
        return model_dir, None, None
    a = Path(adapter_dir)
    if not a.exists():
        raise MMTuneError(f"adapter path '{a}' does not exist")
    ckpt = find_checkpoint(a)
    if ckpt is not None:
        base, adapter, tok = _checkpoint_sources(ckpt, base_override=model_dir)
        if adapter is None:
            raise MMTuneError(f"checkpoint '{ckpt}' is a full fine-tune, not an adapter: load it as the model")
        return base, adapter, tok
    if not (a / "adapter_config.json").is_file():
        raise MMTuneError(f"adapter path '{a}' has no adapter_config.json (not a PEFT adapter directory)")
    return _adapter_sources(a, base_override=model_dir)
