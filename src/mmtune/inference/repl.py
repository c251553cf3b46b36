"""The terminal chat loop (``mmtune chat``) over a :class:`~mmtune.inference.session.ChatSession`,
for text and composed models alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import MMTuneError
from .session import ChatSession

HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit"
MEDIA_HELP = {"image": "/image PATH", "audio": "/audio PATH"}


def run_terminal_chat(session: ChatSession, input_fn: Callable[[str], str] = input,
                      print_fn: Callable[..., None] = print, images: Sequence[str] = (),
                      audios: Sequence[str] = ()) -> None:
    """A read-eval-print loop over ``session``; replies are printed as they stream.

    ``/reset`` clears the conversation, ``/system TEXT`` sets the system prompt (and resets),
    ``/exit`` (or end of input, Ctrl-D / Ctrl-C) ends. A model with a vision or audio encoder
    also takes ``/image PATH`` and ``/audio PATH``, attached to the next message (as are
    ``images`` / ``audios``), and the adapter its router chose is shown before each reply.
    Notes of a reply (turns dropped to fit the context) are printed before it. ``print_fn`` is
    called like ``print``.
    """
    media = [k for k in MEDIA_HELP if k in session.model.modalities]
    pending: dict[str, list[str]] = {"image": list(images), "audio": list(audios)}
    print_fn(HELP + "".join(f", {MEDIA_HELP[k]} (attach to the next message)" for k in media))
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
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                session.reset()
                pending = {"image": [], "audio": []}
                print_fn("[conversation reset]")
            elif cmd == "/system":
                session.set_system(arg)
                print_fn(f"[system prompt {'set' if arg else 'cleared'}; conversation reset]")
            elif cmd[1:] in media and arg:
                pending[cmd[1:]].append(arg)
                print_fn(f"[attached {arg} to the next message]")
            else:
                print_fn(f"unknown command {cmd}; {HELP}")
            continue
        try:
            reply = session.send(text, pending["image"], pending["audio"])
        except MMTuneError as e:
            print_fn(f"[{e}]")
            continue
        pending = {"image": [], "audio": []}
        for note in reply.notes:
            print_fn(f"[{note}]")
        print_fn("assistant> " + (f"[router: {reply.route}] " if media else ""), end="", flush=True)
        try:
            for piece in reply:
                print_fn(piece, end="", flush=True)
        except MMTuneError as e:
            print_fn(f"[{e}]", end="")
        except KeyboardInterrupt:
            reply.close()
            print_fn(" [interrupted]", end="")
        print_fn()
