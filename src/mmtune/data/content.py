"""OpenAI chat content parts -> text and media references: the one parser behind data loading
(``messages`` records, multimodal ``openai`` records) and the OpenAI-compatible server.

A message's ``content`` is a string or a list of parts
(https://platform.openai.com/docs/api-reference/chat/create, "content parts")::

    {"type": "text", "text": "What is this?"}              (a bare string part counts as text)
    {"type": "image_url", "image_url": {"url": "a.png" | "data:image/png;base64,..."}}
    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}
    {"type": "input_audio", "input_audio": {"path": "a.wav"}}          (mmtune data files)
    {"type": "image", "image": "a.png"}, {"type": "audio", "audio": "a.wav"}   (LLaVA-style)

:func:`parse_content` checks the structure and decodes inline (base64) data; it does not
decide where a reference may point: data loading confines paths to the data root, the server
accepts inline data only. Every problem is a :class:`~mmtune.errors.DataError` with a stable
``reason`` and the ``field`` that holds the bad value (``messages[0].content[1].image_url``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

#: Part kinds: what the caller may accept (``kinds``) and what a :class:`ContentPart` is.
KINDS = ("text", "image", "audio")
#: Part ``type`` values read, and the kind each gives.
PART_TYPES = {"text": "text", "image_url": "image", "image": "image", "input_audio": "audio", "audio": "audio"}


@dataclass(frozen=True)
class ContentPart:
    """One parsed part. ``text`` for text parts; for media either ``ref`` (a path or URL, not yet
    resolved) or ``data`` (decoded inline bytes). ``where`` is the part's location
    (``messages[0].content[1]``), ``field`` the location of its value."""

    kind: str  # text | image | audio
    text: str = ""
    ref: str | None = None
    data: bytes | None = None
    format: str | None = None  # input_audio.format, or the data URL's MIME subtype
    where: str = ""
    field: str = ""


def _problem(message: str, reason: str, field: str) -> DataError:
    return DataError(None, None, message, reason, field)


def decode_data_url(value: str, field: str) -> tuple[bytes, str | None]:
    """``data:<mime>;base64,<payload>`` -> (bytes, MIME subtype); only base64 URLs are read."""
    head, _, payload = value.partition(",")
    if ";base64" not in head:
        raise _problem(f"'{field}': only base64 data URLs are supported (data:<mime>;base64,...)", "bad_data_url",
                       field)
    mime = head[len("data:"):].split(";")[0]
    return _b64(payload, field), (mime.split("/")[-1] or None) if mime else None


def _b64(payload: Any, field: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise _problem(f"'{field}' is not valid base64", "bad_data_url", field) from None


def _media(kind: str, value: Any, field: str, where: str, fmt: str | None = None) -> ContentPart:
    if not isinstance(value, str) or not value:
        raise _problem(f"'{field}' must be a non-empty string (a path, a URL or a data: URL)", "wrong_type", field)
    if value.startswith("data:"):
        data, subtype = decode_data_url(value, field)
        return ContentPart(kind, data=data, format=fmt or subtype, where=where, field=field)
    return ContentPart(kind, ref=value, format=fmt, where=where, field=field)


def _part(part: Any, where: str) -> ContentPart:
    if isinstance(part, str):
        return ContentPart("text", text=part, where=where, field=where)
    if not isinstance(part, dict):
        raise _problem(f"{where} has unsupported type {type(part).__name__!r}; a part is an object with 'type'",
                       "unsupported_content", where)
    kind = part.get("type", "text")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _problem(f"{where}.text must be a string", "wrong_type", f"{where}.text")
        return ContentPart("text", text=part["text"], where=where, field=f"{where}.text")
    if kind == "image_url":
        ref = part.get("image_url")
        return _media("image", ref.get("url") if isinstance(ref, dict) else ref, f"{where}.image_url", where)
    if kind in ("image", "audio"):
        return _media(kind, part.get(kind) or part.get("path"), f"{where}.{kind}", where)
    if kind == "input_audio":
        ref = part.get("input_audio")
        if not isinstance(ref, dict):
            raise _problem(f"{where}.input_audio must be an object with base64 `data` (and `format`), or `path`",
                           "wrong_type", f"{where}.input_audio")
        fmt = ref.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise _problem(f"{where}.input_audio.format must be a string such as 'wav'", "wrong_type",
                           f"{where}.input_audio.format")
        if ref.get("data") is not None:
            field = f"{where}.input_audio.data"
            return ContentPart("audio", data=_b64(ref["data"], field), format=fmt, where=where, field=field)
        return _media("audio", ref.get("path") or ref.get("url"), f"{where}.input_audio", where, fmt)
    raise _problem(f"{where} has unsupported type {kind!r}; supported: {', '.join(PART_TYPES)}",
                   "unsupported_content", where)


def parse_content(content: Any, where: str, kinds: Collection[str] = KINDS) -> list[ContentPart]:
    """The parts of one message's ``content`` (a string is one text part; None is no part).

    ``kinds``: the part kinds the caller takes; a part of another kind is an
    ``unsupported_content`` error naming it (text-only formats pass ``("text",)``).
    """
    if content is None:
        return []
    if isinstance(content, str):
        return [ContentPart("text", text=content, where=where, field=where)]
    if not isinstance(content, list):
        raise _problem(f"{where} must be a string or a list of content parts, got {type(content).__name__}",
                       "wrong_type", where)
    parts = []
    for j, raw in enumerate(content):
        pw = f"{where}[{j}]"
        if isinstance(raw, dict) and raw.get("type", "text") in PART_TYPES \
                and PART_TYPES[raw.get("type", "text")] not in kinds:
            only = " and ".join(kinds)
            raise _problem(f"{pw} is a '{raw['type']}' part; only {only} parts are supported here",
                           "unsupported_content", pw)
        parts.append(_part(raw, pw))
    return parts


def content_text(parts: list[ContentPart]) -> str:
    """The text parts joined (media parts contribute nothing)."""
    return "".join(p.text for p in parts if p.kind == "text")
