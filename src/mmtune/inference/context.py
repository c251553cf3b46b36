"""The one policy for a conversation longer than the model's context, shared by terminal chat,
the web UI and the OpenAI-compatible server.

With ``context`` the model's context length, ``max_prompt_tokens`` an optional cap (``--max-
prompt-tokens``) and ``max_new_tokens`` the reply length asked for:

1. the prompt should leave room for the whole reply: it fits the *budget*
   ``min(max_prompt_tokens, context - max_new_tokens)``;
2. while it does not, the oldest exchange is dropped whole: the first user turn after the
   leading system turns, with the turns that follow it up to the next user turn. System turns
   at the start are kept; no turn is ever cut inside; a turn's images and audio go with it, so
   the media of the prompt always match its placeholders (and a composed model's router routes
   on the media still in the prompt);
3. the last exchange (the last user turn and what follows it) is never dropped. If it is still
   over the budget but within the *limit* ``min(max_prompt_tokens, context - 1)``, it is
   answered with the reply cut to what fits (``finish_reason`` "length"); over the limit it is
   refused with :class:`~mmtune.inference.turns.InputError` ``context_length_exceeded``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .turns import InputError

T = TypeVar("T")  # a turn: anything with a ``role``
P = TypeVar("P")  # a rendered prompt: anything with ``ids``


@dataclass(frozen=True)
class Limits:
    """The two bounds of the policy for one reply (None: unbounded)."""

    budget: int | None  # the prompt leaves room for the whole reply
    limit: int | None  # the prompt leaves room for one token

    @classmethod
    def of(cls, context_length: int | None, max_new_tokens: int, max_prompt_tokens: int | None = None) -> Limits:
        def cap(x: int | None) -> int | None:
            vals = [v for v in (x, max_prompt_tokens) if v is not None]
            return min(vals) if vals else None

        if context_length is None:
            return cls(cap(None), cap(None))
        return cls(cap(context_length - max_new_tokens), cap(context_length - 1))


@dataclass
class Fitted(Generic[T, P]):
    """The turns kept, how many were dropped (oldest first), and their rendered prompt."""

    turns: list[T]
    dropped: int
    prompt: P


def leading_system(turns: Sequence[T]) -> int:
    """How many turns at the start are system turns (kept by the policy)."""
    k = 0
    while k < len(turns) and turns[k].role == "system":
        k += 1
    return k


def exchanges(turns: Sequence[T]) -> tuple[list[T], list[list[T]]]:
    """``(leading system turns, exchanges)``: an exchange starts at a user turn and runs to the
    next one (turns before the first user turn form an exchange of their own)."""
    k = leading_system(turns)
    head, units = list(turns[:k]), []
    for t in turns[k:]:
        if not units or t.role == "user":
            units.append([t])
        else:
            units[-1].append(t)
    return head, units


def fit(turns: Sequence[T], render: Callable[[list[T]], P], limits: Limits, context_length: int | None = None,
        hint: str = "shorten it") -> Fitted[T, P]:
    """Apply the policy: the kept turns, the number dropped, and their prompt (``render(turns)``,
    whose ``ids`` are counted). Raises InputError ``context_length_exceeded`` when even the last
    exchange alone is over ``limits.limit``."""
    head, units = exchanges(turns)
    dropped = 0
    while True:
        kept = head + [t for u in units for t in u]
        prompt = render(kept)
        n = len(prompt.ids)
        if limits.budget is None or n <= limits.budget or len(units) <= 1:
            break
        dropped += len(units.pop(0))
    if limits.limit is not None and n > limits.limit:
        ctx = f" (context {context_length})" if context_length is not None else ""
        kept_only = " with only the last message kept" if dropped else ""
        raise InputError(f"the message is too long: the prompt is {n} tokens{kept_only}, over this model's limit "
                         f"of {limits.limit} tokens{ctx}; {hint}.", "messages", "context_length_exceeded")
    return Fitted(kept, dropped, prompt)
