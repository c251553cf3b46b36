"""Data sources: read the records of a :class:`~mmtune.config.SourceConfig`, normalise them, and mix
several sources.

Readers (chosen from the path):

- ``*.jsonl`` / ``*.ndjson``: one JSON object per line; line numbers are kept for error messages.
- ``*.json``: a JSON array of records (line numbers are those of each element's first character),
  or JSON lines in a ``.json`` file.
- ``*.parquet``: read with pyarrow; the "line" of a record is its 1-based row number.
- a directory written by ``datasets.Dataset.save_to_disk`` (the ``train`` split of a DatasetDict);
  "line" is the row number.
- ``builtin:NAME``: :func:`mmtune.data.builtin.builtin_records`.

Bad records: with ``on_bad_record="error"`` the first one raises its :class:`DataError` (file,
line, field, problem); with ``"skip"`` it is dropped and counted per reason in
:class:`BadRecordStats`, whose :meth:`~BadRecordStats.summary` the caller prints at the end.
A file that cannot be parsed as a whole (a broken JSON array) always raises.

Hostile JSON is a bad record like any other, never a traceback: a record nested deeper than the
JSON parser's recursion limit (reason ``nested_too_deep``), and a string holding a lone UTF-16
surrogate such as ``"\\ud800"`` (``lone_surrogate``; valid JSON, but the text cannot be encoded as
UTF-8, so no tokenizer can read it).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, DataError, MMTuneError
from .formats import FORMATS, detect_format, normalize

T = TypeVar("T")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(slots=True)
class Record:
    """A normalised sample and where it came from (for error messages)."""

    sample: dict
    path: str
    line: int | None


@dataclass
class BadRecordStats:
    """Counts of skipped records per reason, with the first message seen for each reason."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, err: DataError) -> None:
        self.counts[err.reason] += 1
        self.first.setdefault(err.reason, str(err))

    def merge(self, other: BadRecordStats) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            self.first.setdefault(reason, other.first.get(reason, ""))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "bad records: none"
        parts = ", ".join(f"{r} {n}" for r, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"skipped {self.total} bad record{'s' if self.total != 1 else ''}: {parts}"

    def examples(self) -> list[str]:
        """One example message per reason (the first record that failed for it)."""
        return [f"{r}: {self.first[r]}" for r in sorted(self.first)]


def locate(err: DataError, path: str, line: int | None) -> DataError:
    """``err`` (raised without a location by a format) re-created with file and line."""
    return DataError(path, line, err.problem, err.reason, err.field)


# ---------------------------------------------------------------------------------------------
# Raw readers: yield (line, record, error) so that one bad line does not end the file


def _utf8(raw: bytes, path: str, line_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(path, line, f"bytes are not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                        "re-encode the file as UTF-8", "non_utf8") from None


# A JSON escape of a UTF-16 surrogate (U+D800..U+DFFF): a cheap test before looking for lone ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate_field(obj: Any) -> str | None:
    """The field path (``messages[1].content``) of the first string (key or value) in ``obj`` that
    holds a lone UTF-16 surrogate, or None. Iterative, so any nesting depth is fine."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if _has_lone_surrogate(node):
                return where or "<record>"
        elif isinstance(node, dict):
            children = []
            for k, v in node.items():
                key = f"{where}.{k}" if where else str(k)
                if isinstance(k, str) and _has_lone_surrogate(k):
                    return f"{where}.<key>" if where else "<key>"
                children.append((v, key))
            stack += reversed(children)
        elif isinstance(node, list):
            stack += reversed([(v, f"{where}[{j}]") for j, v in enumerate(node)])
    return None


def _surrogate_error(path: str, line: int | None, field: str) -> DataError:
    return DataError(path, line, "the text holds a lone UTF-16 surrogate escape (e.g. \"\\ud800\" without its pair); "
                     "it cannot be encoded as UTF-8 or tokenized: fix the escape, or set data.on_bad_record: skip",
                     "lone_surrogate", field)


def _too_deep(path: str, line: int) -> DataError:
    return DataError(path, line, "malformed JSON: the record is nested too deeply for the JSON parser (more levels "
                     "of [ / { than Python's recursion limit); flatten it, or set data.on_bad_record: skip",
                     "nested_too_deep")


def _parse_line(path: str, i: int, text: str) -> tuple[Any, DataError | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, DataError(path, i, f"malformed JSON: {e.msg} (column {e.colno}); fix the line, or set "
                               "data.on_bad_record: skip to skip bad records", "malformed_json")
    except RecursionError:
        return None, _too_deep(path, i)
    if _SURROGATE_ESCAPE.search(text) and (where := lone_surrogate_field(obj)) is not None:
        return None, _surrogate_error(path, i, where)
    return obj, None


def _iter_jsonl(path: str, data: bytes) -> Iterator[tuple[int, Any, DataError | None]]:
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = _utf8(raw, path, i - 1)
        except DataError as e:
            yield i, None, e
            continue
        obj, err = _parse_line(path, i, text)
        yield i, obj, err


def _iter_json_array(path: str, text: str) -> Iterator[tuple[int, Any, DataError | None]]:
    """Elements of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, msg: str) -> DataError:
        line = text.count("\n", 0, i) + 1
        return DataError(path, line, f"malformed JSON: {msg} (the file is a JSON array; fix it or convert it to "
                         "JSON lines, one record per line, so single bad records can be skipped)", "malformed_json")

    i = skip_ws(0) + 1  # past '['
    line, last = 1, 0
    may_have_surrogates = _SURROGATE_ESCAPE.search(text) is not None
    while True:
        i = skip_ws(i)
        if i >= n:
            raise fail(i, "the array is not closed with ']'")
        if text[i] == "]":
            break
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        except RecursionError:  # the rest of the array cannot be delimited without parsing this element
            raise fail(i, "an element is nested too deeply for the JSON parser") from None
        line += text.count("\n", last, i)
        last = i
        where = lone_surrogate_field(obj) if may_have_surrogates else None
        yield line, (None if where else obj), (_surrogate_error(path, line, where) if where else None)
        i = skip_ws(j)
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] != "]":
            raise fail(i, "expected ',' or ']' between records")
    if skip_ws(i + 1) < n:
        raise fail(skip_ws(i + 1), "extra data after the closing ']'")


def _iter_table(rows) -> Iterator[tuple[int, Any, DataError | None]]:
    for i, row in enumerate(rows, start=1):
        yield i, row, None


def _load_datasets_dir(path: Path):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise MMTuneError(f"{path} looks like a `datasets` directory but the `datasets` package is not "
                          "installed (pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise MMTuneError(f"{path} is a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                              "point the source at one split saved on its own")
    return ds


def iter_raw(path: str, seed: int = 0) -> Iterator[tuple[int | None, Any, DataError | None]]:
    """``(line, raw_record, error)`` for every record at ``path``; ``error`` is set (and the record
    None) for a line that cannot be read. Whole-file problems raise."""
    if path.startswith("builtin:"):
        from .builtin import builtin_records

        name = path[len("builtin:"):]
        try:
            rows = builtin_records(name, seed=seed)
        except ValueError as e:
            raise MMTuneError(f"data source '{path}': {e}") from None
        yield from _iter_table(rows)
        return
    p = Path(path)
    if not p.exists():
        where = "" if p.is_absolute() else f" (looked in {Path.cwd()})"
        raise MMTuneError(f"data source not found: {path}{where}; check the source's `path`")
    if p.is_dir():
        if not any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise MMTuneError(f"data source {path} is a directory but not one written by datasets' save_to_disk "
                              "(no dataset_info.json / dataset_dict.json)")
        yield from _iter_table(_load_datasets_dir(p))
        return
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:
            raise MMTuneError(f"cannot read Parquet file {path}: {e}") from None
        yield from _iter_table(table.to_pylist())
        return
    if suffix not in (".json", *JSONL_SUFFIXES):
        raise MMTuneError(f"unsupported data file type '{suffix or p.name}' for {path}; use .jsonl, .json, "
                          ".parquet, a datasets save_to_disk directory or builtin:NAME")
    data = p.read_bytes()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, data)
        return
    text = _utf8(data, path)
    first = text.lstrip()[:1]
    if first == "[":
        yield from _iter_json_array(path, text)
    elif first == "{":  # JSON lines in a .json file
        yield from _iter_jsonl(path, data)
    elif first:
        raise DataError(path, text[: len(text) - len(text.lstrip())].count("\n") + 1,
                        "malformed JSON: a .json data file must hold an array of records or one record per line",
                        "malformed_json")


# ---------------------------------------------------------------------------------------------
# Loading one source


def load_source(src, *, on_bad_record: str = "error", stats: BadRecordStats | None = None,
                seed: int = 0) -> list[Record]:
    """Normalised records of ``src`` (a SourceConfig), at most ``src.max_records`` of them.

    Under ``on_bad_record="skip"`` bad records are counted into ``stats`` and dropped.
    """
    if src.format != "auto":
        FORMATS.get(src.format)  # unknown names fail with the valid ones
    stats = stats if stats is not None else BadRecordStats()
    fmt = src.format
    out: list[Record] = []
    for line, raw, err in iter_raw(src.path, seed):
        if err is None:
            try:
                if fmt == "auto" and isinstance(raw, dict):
                    fmt = detect_format(raw, src.text_field)  # the first record fixes the source's format
                sample = normalize(raw, fmt, src.text_field)
            except DataError as e:
                err = locate(e, src.path, line)
        if err is not None:
            if on_bad_record == "error":
                raise err
            stats.add(err)
            continue
        out.append(Record(sample, src.path, line))
        if src.max_records is not None and len(out) >= src.max_records:
            break
    if not out:
        hint = f" ({stats.summary()})" if stats.total else ""
        raise MMTuneError(f"data source {src.path} has no usable records{hint}")
    return out


# ---------------------------------------------------------------------------------------------
# Mixtures


def mixture_counts(sizes: Sequence[int], sources: Sequence) -> list[int]:
    """How many items each source contributes to one epoch.

    Sources with ``weight`` share the total of their own sizes in proportion to their weights
    (normalised over the sources that set one); the others contribute ``repeat x size`` items.
    """
    for i, src in enumerate(sources):
        if src.weight is not None and src.repeat != 1.0:
            raise ConfigError(f"data source {i} ({src.path}): set either `weight` or `repeat`, not both")
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    total_w = sum(sources[i].weight for i in weighted)
    pool = sum(sizes[i] for i in weighted)
    counts = []
    for n, src in zip(sizes, sources):
        if src.weight is not None:
            counts.append(int(round(src.weight / total_w * pool)))
        else:
            counts.append(int(round(src.repeat * n)))
    return counts


def take(items: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items: whole copies of ``items`` plus a seeded sample without replacement for the
    fraction."""
    if not items or count <= 0:
        return []
    copies, rest = divmod(count, len(items))
    out = list(items) * copies
    if rest:
        idx = sorted(rng.sample(range(len(items)), rest))
        out += [items[j] for j in idx]
    return out


def mix(groups: Sequence[Sequence[T]], sources: Sequence, seed: int, shuffle: bool = True) -> list[T]:
    """One epoch of the mixture of ``groups`` (one list per source), shuffled with ``seed``."""
    counts = mixture_counts([len(g) for g in groups], sources)
    out: list[T] = []
    for i, (g, c) in enumerate(zip(groups, counts)):
        out += take(g, c, random.Random(f"{seed}-mix-{i}"))
    if shuffle:
        random.Random(f"{seed}-shuffle").shuffle(out)
    return out


def split_eval(records: Sequence[T], fraction: float, seed: int, salt: str = "") -> tuple[list[T], list[T]]:
    """(train, eval): a seeded ``fraction`` of ``records`` held out, at least one when fraction > 0."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    k = min(len(records) - 1, max(1, math.floor(len(records) * fraction + 0.5)))
    held = set(random.Random(f"{seed}-eval-{salt}").sample(range(len(records)), k))
    train = [r for i, r in enumerate(records) if i not in held]
    ev = [r for i, r in enumerate(records) if i in held]
    return train, ev
