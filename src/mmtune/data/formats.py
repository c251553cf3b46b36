"""Record formats: one raw record (a dict read from a file) -> one normalised sample.

A normalised sample is either a conversation or a plain document::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    {"text": str}

Formats (the names of :data:`FORMATS`; ``auto`` detects one from the keys of a record):

- ``alpaca``: ``instruction``, optional ``input``, ``output``, optional ``system`` and optional
  ``history`` (a list of ``[query, response]`` pairs that precede the instruction). The user turn is
  ``instruction + "\\n" + input`` as in LLaMA-Factory (``data/converter.py::AlpacaDatasetConverter``).
- ``sharegpt``: ``conversations`` (or ``messages``) holding ``{"from": ..., "value": ...}`` turns,
  ``from`` one of human/user/gpt/assistant/system; optional top-level ``system``.
- ``messages``: OpenAI chat ``{"messages": [{"role": ..., "content": ...}]}``; content is a string or
  a list of ``{"type": "text", "text": ...}`` parts.
- ``text``: a document for continued pretraining, read from ``SourceConfig.text_field``.

Every problem raises :class:`~mmtune.errors.DataError` with a stable ``reason`` (the key used to
count skipped records) and the offending ``field``; the loader in ``sources.py`` fills in the file
and line. Conversations must be: an optional system turn first, then user and assistant turns
alternating, starting with user and ending with a non-empty assistant turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import DataError
from ..registry import Registry
from .content import content_text, parse_content

Sample = dict[str, Any]
FormatFn = Callable[..., Sample]

FORMATS: Registry[FormatFn] = Registry("data format")

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def _problem(problem: str, reason: str, field: str | None = None) -> DataError:
    """A DataError without a location; the loader re-raises it with file and line."""
    return DataError(None, None, problem, reason, field)


def _string(record: dict, key: str, *, required: bool, field: str | None = None) -> str | None:
    field = field or key
    if key not in record or record[key] is None:
        if required:
            present = ", ".join(sorted(map(str, record))) or "none"
            raise _problem(f"missing field '{key}' (keys present: {present})", "missing_field", field)
        return None
    value = record[key]
    if not isinstance(value, str):
        raise _problem(f"field '{field}' must be a string, got {type(value).__name__}", "wrong_type", field)
    return value


def check_conversation(messages: list[dict], fields: list[str]) -> list[dict]:
    """Validate the turn structure of a normalised conversation and return it.

    ``fields[i]`` names where turn i came from in the raw record (e.g. ``conversations[3]``), so
    that an error points at the raw field.
    """
    if not messages:
        raise _problem("the conversation has no turns", "empty_conversation", fields[0] if fields else None)
    start = 1 if messages[0]["role"] == "system" else 0
    for i, msg in enumerate(messages):
        if msg["role"] == "system" and i != 0:
            raise _problem(f"{fields[i]} is a system turn; a system prompt may only come first",
                           "bad_turn_order", fields[i])
    expected = "user"
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if role != expected:
            raise _problem(f"{fields[i]} is a '{role}' turn but '{expected}' was expected: after an optional "
                           "system turn, user and assistant turns must alternate, starting with user",
                           "bad_turn_order", fields[i])
        if role == "assistant" and not messages[i]["content"].strip():
            raise _problem(f"assistant turn {fields[i]} is empty; every assistant turn must have text to "
                           "learn from", "empty_assistant", fields[i])
        expected = "assistant" if expected == "user" else "user"
    if len(messages) == start:
        raise _problem("the conversation has only a system turn", "bad_turn_order", fields[0])
    if messages[-1]["role"] != "assistant":
        raise _problem(f"the conversation ends with a '{messages[-1]['role']}' turn ({fields[-1]}); it must end "
                       "with an assistant turn", "bad_turn_order", fields[-1])
    return messages


@FORMATS.register("alpaca")
def alpaca(record: dict, text_field: str = "text") -> Sample:
    instruction = _string(record, "instruction", required=True)
    extra = _string(record, "input", required=False)
    output = _string(record, "output", required=True)
    if not output.strip():
        raise _problem("'output' is empty; every assistant turn must have text to learn from",
                       "empty_assistant", "output")
    system = _string(record, "system", required=False)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    fields = ["system"] if system else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise _problem(f"'history' must be a list of [query, response] pairs, got {type(history).__name__}",
                       "wrong_type", "history")
    for i, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(p, str) for p in pair)):
            raise _problem(f"history[{i}] must be a [query, response] pair of strings, got {pair!r:.80}",
                           "wrong_type", f"history[{i}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        fields += [f"history[{i}][0]", f"history[{i}][1]"]
    user = f"{instruction}\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    fields += ["instruction", "output"]
    return {"messages": check_conversation(messages, fields)}


def _turn_list(record: dict, keys: tuple[str, ...]) -> tuple[str, list]:
    for key in keys:
        if key in record:
            turns = record[key]
            if not isinstance(turns, list):
                raise _problem(f"'{key}' must be a list of turns, got {type(turns).__name__}", "wrong_type", key)
            return key, turns
    present = ", ".join(sorted(map(str, record))) or "none"
    raise _problem(f"missing field '{keys[0]}' (keys present: {present})", "missing_field", keys[0])


@FORMATS.register("sharegpt")
def sharegpt(record: dict, text_field: str = "text") -> Sample:
    key, turns = _turn_list(record, ("conversations", "messages"))
    messages: list[dict] = []
    fields: list[str] = []
    system = _string(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
        fields.append("system")
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _problem(f"{where} must be an object with 'from' and 'value'", "wrong_type", where)
        speaker = _string(turn, "from", required=True, field=f"{where}.from")
        if speaker not in SHAREGPT_ROLES:
            raise _problem(f"unknown role '{speaker}' in {where}; allowed: {', '.join(SHAREGPT_ROLES)}",
                           "unknown_role", f"{where}.from")
        value = _string(turn, "value", required=True, field=f"{where}.value")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
        fields.append(where)
    return {"messages": check_conversation(messages, fields or [key])}


@FORMATS.register("messages")
def messages_format(record: dict, text_field: str = "text") -> Sample:
    key, turns = _turn_list(record, ("messages",))
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _problem(f"{where} must be an object with 'role' and 'content'", "wrong_type", where)
        role = _string(turn, "role", required=True, field=f"{where}.role")
        if role not in ROLES:
            raise _problem(f"unknown role '{role}' in {where}; allowed: {', '.join(ROLES)}", "unknown_role",
                           f"{where}.role")
        if "content" not in turn:
            raise _problem(f"missing field 'content' in {where}", "missing_field", f"{where}.content")
        parts = parse_content(turn["content"], f"{where}.content", kinds=("text",))
        messages.append({"role": role, "content": content_text(parts)})
    return {"messages": check_conversation(messages, [f"{key}[{i}]" for i in range(len(messages))] or [key])}


@FORMATS.register("text")
def text(record: dict, text_field: str = "text") -> Sample:
    doc = _string(record, text_field, required=True)
    if not doc.strip():
        raise _problem(f"'{text_field}' is empty", "empty_text", text_field)
    return {"text": doc}


def detect_format(record: dict, text_field: str = "text") -> str:
    """The format a record's keys indicate; raises DataError (missing_field) if none does."""
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        turns = record["messages"]
        first = turns[0] if isinstance(turns, list) and turns else None
        return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if text_field in record:
        return "text"
    present = ", ".join(sorted(map(str, record))) or "none"
    raise _problem(f"cannot tell the record format from its keys ({present}); expected 'messages' "
                   f"(messages), 'conversations' (sharegpt), 'instruction'+'output' (alpaca) or "
                   f"'{text_field}' (text), or set the source's `format`", "missing_field")


def normalize(record: Any, fmt: str, text_field: str = "text") -> Sample:
    """Normalise one raw record with format ``fmt`` (a name of :data:`FORMATS`, or ``auto``)."""
    if not isinstance(record, dict):
        raise _problem(f"a record must be a JSON object, got {type(record).__name__}", "not_an_object")
    if fmt == "auto":
        fmt = detect_format(record, text_field)
    return FORMATS.get(fmt)(record, text_field=text_field)


def is_chat(sample: Sample) -> bool:
    return "messages" in sample
