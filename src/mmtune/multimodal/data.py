"""Multimodal records -> examples for a :class:`~mmtune.multimodal.model.ComposedModel`.

Record formats (JSON / JSONL / anything :func:`mmtune.data.sources.iter_raw` reads):

- ``llava``: ``{"id", "image": "a.png" | [...], "audio": "a.wav" | [...], "conversations":
  [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "..."}]}``
  (LLaVA / ShareGPT4V style; ``images`` / ``audios`` are accepted too). Each ``<image>`` /
  ``<audio>`` tag marks where the media goes, in order. A record with media but no tag gets
  them at the start of its first user turn (``<image>\\n``), as LLaVA's own preprocessing does.
- ``openai``: ``{"messages": [{"role": "user", "content": [{"type": "text", "text": ...},
  {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "input_audio", "input_audio":
  {"path": "a.wav"}}]}, ...]}``; a part's ``url`` / ``path`` is a file path (``file://`` allowed)
  or a ``data:`` URL (base64), ``input_audio`` may carry base64 ``data`` with its ``format``
  as OpenAI's API does. ``{"type": "image", "image": path}`` and ``{"type": "audio", "audio":
  path}`` parts are read too.

Paths are relative to the source's data root (default: the directory of the data file) and
must stay inside it: an absolute path or one that escapes with ``..`` (or a symlink pointing
out) is a :class:`~mmtune.errors.DataError`, as is a missing or undecodable image/audio file
and an image of more than :data:`MAX_IMAGE_PIXELS` pixels (64 Mi px; a decompression bomb),
each naming the data file, line, record id and field. Under ``on_bad_record: skip`` they are
counted per reason instead.

Tokenization: each tag is replaced by the model's placeholder token, the conversation is
encoded by the chat template (labels on assistant turns), and every placeholder is expanded
to the exact number of feature tokens of its image / clip (labels -100). Length policy: a
sample longer than ``max_length`` is a bad record (``too_long``) unless ``truncation`` is on;
truncation never cuts a placeholder run: a sample whose cut would fall inside a run (or drop a
run whole) is dropped and counted (``truncation_cuts_placeholder``).

Packing (:func:`pack_mm_examples`) packs each modality group separately (a row is one group,
so one route), and attaches each row's images / clips in the order of its samples; position
ids restart per sample and no attention mask is passed, so samples never see each other.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.content import ContentPart, decode_data_url, parse_content
from ..data.formats import FORMATS, check_conversation
from ..data.packing import collate_packed, collate_padded, pack_examples
from ..data.sources import BadRecordStats, iter_raw, take
from ..data.templates import IGNORE
from ..errors import DataError, MMTuneError
from ..util import default_cache_root
from .audio import SAMPLE_RATE, load_audio, resample
from .groups import AUDIO_TAG, IMAGE_TAG, group_of, split_by_group
from .synthetic_audio import make_spoken_digits_dataset, speak
from .synthetic_images import make_ocr_dataset, make_shapes_dataset, save_dataset

if TYPE_CHECKING:  # the model is passed in; the data layer only reads its geometry
    from .model import ComposedModel

log = logging.getLogger(__name__)

TRUNCATION_CUTS_PLACEHOLDER = "truncation_cuts_placeholder"
TRUNCATED_EMPTY = "truncated_no_supervised"
MEDIA_KEYS = {"image": ("image", "images"), "audio": ("audio", "audios")}


@dataclass
class Media:
    """Where one image or clip comes from: a confined file path, or inline bytes (data URL)."""

    kind: str  # image | audio
    path: Path | None = None
    data: bytes | None = None
    field: str = ""

    def describe(self) -> str:
        return f"'{self.path}'" if self.path is not None else f"inline {self.kind} ({len(self.data or b'')} bytes)"


# ---------------------------------------------------------------------------------------------
# Built-in data


#: ``builtin:NAME`` sources, drawn in code (mmtune.multimodal.synthetic_images / synthetic_audio):
#: NAME -> (what, default number of records). ``NAME-eval`` is a held-out draw (another seed).
BUILTIN_SOURCES = {
    "shapes-caption": ("shapes images, 'Describe the image briefly.' -> caption", 400),
    "shapes-vqa": ("shapes images, colour / count / position questions", 400),
    "ocr": ("64 px images of one word or number, 'What is written in the image?'", 200),
    "ocr-wide": ("4:1 images of 3-4 words/numbers (several tiles)", 200),
    "spoken-digits": ("1-4 spoken digits (procedural engine), 'Transcribe the digits.'", 400),
    "shapes-spoken-vqa": ("shapes image + the question spoken as audio (vision-speech)", 400),
}
BUILTIN_IMAGE_SIZE = 64

#: Largest image a record may hold, in pixels (width x height): 64 Mi px, e.g. 8192 x 8192. Checked
#: from the file header before decoding, so a decompression bomb (a few kB of PNG that would
#: inflate to gigabytes) is a bad record (``image_too_large``) instead of an out-of-memory or
#: PIL's ``DecompressionBombError``. Far above what the tilers use: Phi-4 fits every image into at
#: most 36 crops of 448 px (7.2 Mpx), InternVL into 12 tiles (2.4 Mpx). Pass ``max_pixels`` to
#: :func:`load_image` for another limit.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
EVAL_SEED_OFFSET = 1000
SPOKEN_QUESTION = {"color": "color {kind}", "count": "count {kind}", "position": "where {kind}"}


def builtin_source(name: str, n: int | None = None, seed: int = 0, cache_root: str | Path | None = None) -> Path:
    """Write built-in source ``name`` (see :data:`BUILTIN_SOURCES`) once into the cache; returns its JSONL.

    Records depend only on ``(name, n, seed)``; ``NAME-eval`` uses seed + 1000, disjoint draws.
    """

    base, held_out = (name[:-5], True) if name.endswith("-eval") else (name, False)
    if base not in BUILTIN_SOURCES:
        raise MMTuneError(f"unknown built-in multimodal source 'builtin:{name}'; valid: "
                          + ", ".join(f"{k}[-eval]" for k in BUILTIN_SOURCES))
    n = n or BUILTIN_SOURCES[base][1]
    seed = seed + (EVAL_SEED_OFFSET if held_out else 0)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / "mm-data" / f"{name}-{n}-{seed}"
    jsonl = target / "data.jsonl"
    if jsonl.is_file():
        return jsonl
    target.parent.mkdir(parents=True, exist_ok=True)
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_builtin(base, n, seed, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not jsonl.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return jsonl


def _write_builtin(base: str, n: int, seed: int, out: Path) -> None:
    import json

    if base == "spoken-digits":
        make_spoken_digits_dataset(n, seed, out, engine="procedural", jsonl_name="data.jsonl")
        return
    if base in ("ocr", "ocr-wide"):
        save_dataset(make_ocr_dataset(n, seed=seed, size=BUILTIN_IMAGE_SIZE, wide=base == "ocr-wide"), out, "images")
    elif base in ("shapes-caption", "shapes-vqa"):
        save_dataset(make_shapes_dataset(n, seed=seed, size=BUILTIN_IMAGE_SIZE), out, "images",
                     task="caption" if base == "shapes-caption" else "vqa")
    else:  # shapes-spoken-vqa: the question as audio, answered from the image
        records = make_shapes_dataset(n, seed=seed, size=BUILTIN_IMAGE_SIZE)
        (out / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i, rec in enumerate(records):
            words = rec["question"].rstrip("?").split()  # "How many circles are there" / "... the circle"
            kind = words[2][:-1] if rec["qtype"] == "count" else words[-1]
            img, wav = f"images/{i:05d}.png", f"audio/{i:05d}.wav"
            rec["image"].save(out / img)
            speak(SPOKEN_QUESTION[rec["qtype"]].format(kind=kind), out / wav, voice=f"tone-{i % 8}",
                  engine="procedural")
            lines.append(json.dumps({"id": f"{base}-{seed}-{i:05d}", "image": img, "audio": wav, "conversations": [
                {"from": "human", "value": "<image>\n<audio>\nAnswer the spoken question."},
                {"from": "gpt", "value": rec["answer"]}]}))
        (out / "data.jsonl").write_text("\n".join(lines) + "\n")
        return
    os.replace(out / "images.jsonl", out / "data.jsonl")


# ---------------------------------------------------------------------------------------------
# Paths


def resolve_media_path(root: Path, value, field: str) -> Path:
    """``value`` (relative to ``root``) as an absolute path inside ``root``; DataError otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(None, None, f"'{field}' must be a non-empty file path, got {value!r:.60}", "wrong_type", field)
    if value.startswith(("http://", "https://")):
        raise DataError(None, None, f"'{field}' is a URL ({value[:60]}); mmtune never downloads: save the file under "
                        f"the data root {root} and give its relative path", "remote_url", field)
    if value.startswith("file://"):
        value = value[len("file://"):]
    p = Path(value)
    base = root.resolve()
    if p.is_absolute():
        raise DataError(None, None, f"'{field}' is an absolute path ({value}); media paths must be relative to the data "
                        f"root {base} (set the source's data_root)", "path_escape", field)
    full = (base / p).resolve()
    if not full.is_relative_to(base):
        raise DataError(None, None, f"'{field}' = {value!r} escapes the data root {base}; media must lie inside it "
                        "(no '..' out of it, no symlinks pointing out)", "path_escape", field)
    return full


def _media(kind: str, value, root: Path, field: str) -> Media:
    if isinstance(value, str) and value.startswith("data:"):
        return Media(kind, data=decode_data_url(value, field)[0], field=field)
    return Media(kind, path=resolve_media_path(root, value, field), field=field)


# ---------------------------------------------------------------------------------------------
# Record formats


def _count_tags(messages: list[dict], tag: str) -> int:
    return sum(m["content"].count(tag) for m in messages)


def _llava(record: dict, root: Path) -> dict:
    sample = FORMATS.get("sharegpt")(record)
    messages = sample["messages"]
    media: dict[str, list[Media]] = {}
    for kind, keys in MEDIA_KEYS.items():
        items: list[Media] = []
        for key in keys:
            value = record.get(key)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            items += [_media(kind, v, root, f"{key}[{i}]" if isinstance(value, list) else key)
                      for i, v in enumerate(values)]
        media[kind] = items
        tag = IMAGE_TAG if kind == "image" else AUDIO_TAG
        n_tags = _count_tags(messages, tag)
        if items and n_tags == 0:
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first_user] = {**messages[first_user],
                                    "content": f"{tag}\n" * len(items) + messages[first_user]["content"]}
    return {"messages": messages, "images": media["image"], "audios": media["audio"]}


def _part_media(part: ContentPart, root: Path) -> Media:
    if part.data is not None:
        return Media(part.kind, data=part.data, field=part.field)
    return Media(part.kind, path=resolve_media_path(root, part.ref, part.field), field=part.field)


def _openai(record: dict, root: Path) -> dict:
    turns = record.get("messages")
    if not isinstance(turns, list):
        raise DataError(None, None, "missing field 'messages' (a list of {role, content})", "missing_field", "messages")
    messages, images, audios, fields = [], [], [], []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or "role" not in turn:
            raise DataError(None, None, f"{where} must be an object with 'role' and 'content'", "wrong_type", where)
        if not isinstance(turn.get("content"), (str, list)):
            raise DataError(None, None, f"{where}.content must be a string or a list of parts", "wrong_type", where)
        pieces: list[str] = []
        for part in parse_content(turn["content"], f"{where}.content"):
            if part.kind == "text":
                pieces.append(part.text)
                continue
            m = _part_media(part, root)
            (images if m.kind == "image" else audios).append(m)
            pieces.append((IMAGE_TAG if m.kind == "image" else AUDIO_TAG) + "\n")
        text = "".join(pieces)
        if turn["role"] not in ("system", "user", "assistant"):
            raise DataError(None, None, f"unknown role {turn['role']!r} in {where}", "unknown_role", f"{where}.role")
        messages.append({"role": turn["role"], "content": text})
        fields.append(where)
    return {"messages": check_conversation(messages, fields or ["messages"]), "images": images, "audios": audios}


MM_FORMATS = {"llava": _llava, "openai": _openai}


def detect_mm_format(record: dict) -> str:
    if "conversations" in record:
        return "llava"
    turns = record.get("messages")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
        return "llava"
    if isinstance(turns, list):
        return "openai"
    raise DataError(None, None, f"cannot tell the format from the keys ({', '.join(sorted(map(str, record)))}); "
                    "expected 'conversations' (llava) or 'messages' (openai)", "missing_field")


def normalize_mm_record(record, fmt: str, root: Path) -> dict:
    """``{"messages", "images": [Media], "audios": [Media], "id"}``; tags checked against media."""
    if not isinstance(record, dict):
        raise DataError(None, None, f"a record must be a JSON object, got {type(record).__name__}", "not_an_object")
    fmt = detect_mm_format(record) if fmt == "auto" else fmt
    sample = MM_FORMATS[fmt](record, root)
    for kind, tag in (("images", IMAGE_TAG), ("audios", AUDIO_TAG)):
        n_tags, n_media = _count_tags(sample["messages"], tag), len(sample[kind])
        if n_tags != n_media:
            raise DataError(None, None, f"the conversation has {n_tags} {tag} tag(s) but the record has {n_media} "
                            f"{kind[:-1]} file(s); give one tag per file, in order", "tag_mismatch", kind[:-1])
    sample["id"] = str(record.get("id", ""))
    return sample


# ---------------------------------------------------------------------------------------------
# Loading media


def load_image(media: Media, max_pixels: int = MAX_IMAGE_PIXELS):
    """A PIL RGB image; DataError (missing_file / corrupt_image / image_too_large) naming the file.

    The size is read from the header and checked against ``max_pixels`` (:data:`MAX_IMAGE_PIXELS`)
    before any pixel is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if media.path is not None and not media.path.is_file():
        raise DataError(None, None, f"image file {media.describe()} not found", "missing_file", media.field)

    def too_large(size: str) -> DataError:
        return DataError(None, None, f"image {media.describe()} is {size}, more than the limit of {max_pixels:,} "
                         f"pixels (mmtune.multimodal.data.MAX_IMAGE_PIXELS; a decompression bomb?); downscale it "
                         "or remove the record", "image_too_large", media.field)

    try:
        src = str(media.path) if media.path is not None else io.BytesIO(media.data)
        with warnings.catch_warnings():
            # PIL warns above its own (higher) limit; ours below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                if im.width * im.height > max_pixels:
                    raise too_large(f"{im.width}x{im.height} = {im.width * im.height:,} pixels")
                im.load()
                return im.convert("RGB")
    except Image.DecompressionBombError as e:  # beyond twice PIL's limit it refuses in Image.open already
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise too_large(f"{int(n[1]):,} pixels" if n else "beyond PIL's decompression-bomb limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(None, None, f"image {media.describe()} cannot be decoded ({type(e).__name__}: {e}); re-encode "
                        "it as PNG/JPEG or remove the record", "corrupt_image", media.field) from None


def load_wave(media: Media):
    """A mono 16 kHz float32 waveform; DataError naming the file."""

    if media.path is not None:
        try:
            return load_audio(media.path)
        except DataError as e:
            raise DataError(None, None, f"audio {media.describe()}: {e.problem}", e.reason, media.field) from None
    import soundfile as sf

    try:
        data, sr = sf.read(io.BytesIO(media.data), dtype="float32", always_2d=True)  # (n, channels)
    except Exception as e:  # libsndfile errors differ by version
        raise DataError(None, None, f"audio {media.describe()} cannot be decoded ({type(e).__name__})",
                        "corrupt_audio", media.field) from None
    if data.shape[0] == 0:
        raise DataError(None, None, f"audio {media.describe()} has no samples", "empty_audio", media.field)
    return resample(data.mean(axis=1), sr, SAMPLE_RATE)


class MediaCache:
    """Processed media by file, so an image used by several records is decoded once."""

    def __init__(self, model: ComposedModel):
        self.model = model
        self._items: dict = {}

    def get(self, media: Media):
        key = (media.kind, str(media.path)) if media.path is not None else None
        if key is not None and key in self._items:
            return self._items[key]
        raw = load_image(media) if media.kind == "image" else load_wave(media)
        try:
            item = self.model.process_image(raw) if media.kind == "image" else self.model.process_audio(raw)
        except DataError as e:  # a readable file the model cannot take (extreme aspect ratio, too short)
            raise DataError(None, None, f"{media.kind} {media.describe()}: {e.problem}", e.reason, media.field) from None
        if key is not None:
            self._items[key] = item
        return item


# ---------------------------------------------------------------------------------------------
# Tokenization


def _placeholder_text(model: ComposedModel, messages: list[dict]) -> list[dict]:
    """Tags -> the model's placeholder token strings (one each, expanded after tokenization)."""
    out = []
    for m in messages:
        c = m["content"]
        if model.image_token_id is not None:
            c = c.replace(IMAGE_TAG, model.image_token)
        if model.audio_token_id is not None:
            c = c.replace(AUDIO_TAG, model.audio_token)
        out.append({**m, "content": c})
    return out


def expand_placeholders(ids: list[int], labels: list[int] | None, model: ComposedModel, images: Sequence,
                        audios: Sequence) -> tuple[list[int], list[int] | None]:
    """Replace the k-th image (audio) placeholder token by ``images[k].num_tokens`` copies; their
    labels are -100. The number of placeholders must equal the number of media."""
    runs = {model.image_token_id: list(images), model.audio_token_id: list(audios)}
    found = Counter(t for t in ids if t in runs)
    for token_id, items in runs.items():
        if token_id is not None and found[token_id] != len(items):
            kind = "image" if token_id == model.image_token_id else "audio"
            raise DataError(None, None, f"the tokenized conversation has {found[token_id]} {kind} placeholders for "
                            f"{len(items)} {kind}(s); the text must not contain the reserved token "
                            f"{model.image_token if kind == 'image' else model.audio_token!r}", "tag_mismatch")
    out_ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    seen: Counter = Counter()
    for i, t in enumerate(ids):
        if t in runs and t is not None:
            n = runs[t][seen[t]].num_tokens
            seen[t] += 1
            out_ids += [t] * n
            if out_labels is not None:
                out_labels += [IGNORE] * n
        else:
            out_ids.append(t)
            if out_labels is not None:
                out_labels.append(labels[i])
    return out_ids, out_labels


def prompt_ids(model: ComposedModel, template, messages: list[dict], images: Sequence = (),
               audios: Sequence = ()) -> list[int]:
    """Inference prompt ids (generation prompt included) with placeholders expanded."""
    ids = template.prompt_ids(_placeholder_text(model, messages))
    return expand_placeholders(ids, None, model, images, audios)[0]


def placeholder_runs(ids: Sequence[int], token_ids: set[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of every maximal run of placeholder tokens."""
    runs, start = [], None
    for i, t in enumerate(ids):
        if t in token_ids:
            if start is None:
                start = i
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


@dataclass(frozen=True)
class LengthPolicy:
    max_length: int
    truncation: bool
    loss_on: str = "assistant"


def encode_mm_sample(sample: dict, images: list, audios: list, model: ComposedModel, template,
                     policy: LengthPolicy) -> dict | str:
    """An example ``{"input_ids", "labels", "group", "images", "audios", "id"}``, or the reason
    the sample is dropped (a truncation outcome). Raises DataError for bad records."""
    ids, labels = template.encode(_placeholder_text(model, sample["messages"]), policy.loss_on)
    ids, labels = expand_placeholders(ids, labels, model, images, audios)
    if len(ids) > policy.max_length:
        if not policy.truncation:
            raise DataError(None, None, f"sample is {len(ids)} tokens (media included), longer than data.max_length "
                            f"{policy.max_length}; raise max_length, use fewer crops, or set data.truncation: true",
                            "too_long")
        specials = {t for t in (model.image_token_id, model.audio_token_id) if t is not None}
        if any(end > policy.max_length for _, end in placeholder_runs(ids, specials)):
            return TRUNCATION_CUTS_PLACEHOLDER
        ids, labels = ids[:policy.max_length], labels[:policy.max_length]
        if not any(x != IGNORE for x in labels):
            return TRUNCATED_EMPTY
    if not any(x != IGNORE for x in labels):
        raise DataError(None, None, "sample has no supervised token (nothing to learn from)", "no_supervised_tokens")
    return {"input_ids": ids, "labels": labels, "group": group_of(len(images), len(audios)), "images": list(images),
            "audios": list(audios), "id": sample.get("id", "")}


# ---------------------------------------------------------------------------------------------
# Building datasets


@dataclass
class MMDataReport:
    records: int = 0
    examples: int = 0
    groups: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    tokens: int = 0
    media_tokens: int = 0
    supervised_tokens: int = 0
    longest: int = 0
    max_length: int = 0

    def lines(self) -> list[str]:
        groups = ", ".join(f"{g} {n}" for g, n in sorted(self.groups.items()))
        out = [f"data: {self.records} records -> {self.examples} examples ({groups}); {self.tokens} tokens, "
               f"{self.media_tokens} of them image/audio, {self.supervised_tokens} supervised; longest {self.longest} "
               f"of max_length {self.max_length}"]
        if self.dropped:
            out.append("  dropped: " + ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())))
            out += [f"    e.g. {m}" for m in self.bad_examples]
        return out


def _locate(e: DataError, path: str, line, rec_id: str) -> DataError:
    problem = f"record '{rec_id}': {e.problem}" if rec_id else e.problem
    return DataError(path, line, problem, e.reason, e.field)


def encode_records(path: str, seed: int, max_records: int | None, encode, on_bad_record: str,
                   stats: BadRecordStats):
    """``encode(raw)`` of each record of ``path`` (until ``max_records`` are kept), yielding its
    result: an example, a drop reason (str), or None for a bad record skipped under
    ``on_bad_record: skip`` (counted in ``stats``). A bad record otherwise raises a DataError
    naming the file, line and record id."""
    kept = 0
    for line, raw, err in iter_raw(path, seed):
        if max_records is not None and kept >= max_records:
            return
        rec_id = str(raw.get("id", "")) if isinstance(raw, dict) else ""
        try:
            if err is not None:
                raise err
            out = encode(raw)
        except DataError as e:
            located = e if e.path else _locate(e, path, line, rec_id)
            if on_bad_record == "error":
                raise located from None
            stats.add(located)
            yield None
            continue
        kept += not isinstance(out, str)
        yield out


def build_mm_examples(sources: Sequence, model: ComposedModel, template, policy: LengthPolicy,
                      on_bad_record: str = "error", seed: int = 0,
                      cache: MediaCache | None = None) -> tuple[list[dict], MMDataReport]:
    """Examples of ``sources`` (:class:`~mmtune.multimodal.config.MMSourceConfig`) for ``model``,
    with each source's ``repeat`` applied and shuffled with ``seed``; and a report."""
    cache = cache or MediaCache(model)
    report = MMDataReport(max_length=policy.max_length)
    stats = BadRecordStats()
    specials = {t for t in (model.image_token_id, model.audio_token_id) if t is not None}
    per_source: list[list[dict]] = []
    for src in sources:
        path = src.path
        if path.startswith("builtin:"):
            path = str(builtin_source(path[len("builtin:"):], src.max_records, seed))
        root = Path(src.data_root) if src.data_root else Path(path).parent
        kept: list[dict] = []

        def encode(raw, root=root, fmt=src.format):
            sample = normalize_mm_record(raw, fmt, root)
            images = [cache.get(m) for m in sample["images"]]
            audios = [cache.get(m) for m in sample["audios"]]
            return encode_mm_sample(sample, images, audios, model, template, policy)

        for ex in encode_records(path, seed, src.max_records, encode, on_bad_record, stats):
            report.records += 1
            if isinstance(ex, str):
                report.dropped[ex] += 1
            elif ex is not None:
                kept.append(ex)
        per_source.append(kept)
    report.dropped.update(stats.counts)
    report.bad_examples = stats.examples()
    examples: list[dict] = []
    for i, (src, kept) in enumerate(zip(sources, per_source)):
        examples += take(kept, int(round(src.repeat * len(kept))), random.Random(f"{seed}-mm-{i}"))
    random.Random(f"{seed}-mm-shuffle").shuffle(examples)
    for ex in examples:
        report.groups[ex["group"]] += 1
        report.tokens += len(ex["input_ids"])
        report.media_tokens += sum(1 for t in ex["input_ids"] if t in specials)
        report.supervised_tokens += sum(1 for t in ex["labels"] if t != IGNORE)
        report.longest = max(report.longest, len(ex["input_ids"]))
    report.examples = len(examples)
    if sources and not examples:
        raise MMTuneError("no multimodal training examples left: " + "; ".join(line.strip() for line in report.lines()))
    return examples, report


# ---------------------------------------------------------------------------------------------
# Packing and batches


def pack_mm_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing within each modality group; every row carries its samples'
    images and clips in sample order (``indices``), and its ``group``."""
    rows: list[dict] = []
    for group, idx in split_by_group([ex["group"] for ex in examples]).items():
        members = [examples[i] for i in idx]
        for row in pack_examples(members, max_length):
            row["group"] = group
            row["images"] = [im for j in row["indices"] for im in members[j]["images"]]
            row["audios"] = [a for j in row["indices"] for a in members[j]["audios"]]
            row["indices"] = [idx[j] for j in row["indices"]]
            rows.append(row)
    return rows


def collate_mm(rows: Sequence[dict], pad_id: int) -> dict:
    """Rows (packed or not) -> ``{"groups": [sub-batch per modality group], "input_ids": all real
    token ids of the micro-batch, flat (the loop counts tokens from it)}``.

    A sub-batch has the text collators' tensors (packed: ``position_ids`` and no attention
    mask; unpacked: ``attention_mask``) plus ``images`` / ``audios`` in row order and its
    ``group``; rows keep their order within a group.
    """
    groups = []
    for group, idx in split_by_group([r["group"] for r in rows]).items():
        sub = [rows[i] for i in idx]
        packed = "position_ids" in sub[0]
        batch = collate_packed(sub, pad_id) if packed else collate_padded(sub, pad_id)
        batch["images"] = [im for r in sub for im in r["images"]]
        batch["audios"] = [a for r in sub for a in r["audios"]]
        batch["group"] = group
        groups.append(batch)
    flat = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long)
    return {"groups": groups, "input_ids": flat}
