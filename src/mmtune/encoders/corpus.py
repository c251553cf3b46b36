"""Plain-text corpora for encoder pretraining: documents split into sentences.

A document is a list of sentences in reading order; pairs for NSP/SOP are cut from consecutive
sentences (pairs.py). Sources:

- ``*.txt``: one document per line, or documents separated by blank lines
  (``encoder.corpus_format``); within a paragraph every line and every sentence is a sentence.
- ``*.jsonl`` / ``*.json``: one document per record, in the source's ``text_field``.
- ``builtin:encoder-corpus``: :func:`builtin_corpus`, generated in code.

Bad input is skipped and counted, never silently dropped: whitespace-only lines
(``whitespace_lines``), documents with no text (``empty_documents``); pairs.py adds documents too
short to form a pair. :class:`CorpusReport` carries the counts to the run's report.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SourceConfig
from ..data.builtin import CAPITALS
from ..errors import ConfigError, DataError

# Words of four categories. The built-in corpus uses every word in category-specific contexts;
# the built-in classification task (tasks.py) trains on the first TRAIN_WORDS of each category and
# evaluates on the rest, so only a model that learned the categories from the corpus (or a real
# pretrained model) can label the held-out words.
LEXICON: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "cow", "sheep", "goat", "pig", "rabbit", "duck", "fox", "wolf", "bear",
               "deer", "mouse", "lion", "tiger"),
    "food": ("bread", "cheese", "apple", "banana", "rice", "soup", "pasta", "cake", "pizza", "salad", "butter",
             "honey", "orange", "potato", "carrot", "cookie"),
    "vehicle": ("car", "bus", "truck", "train", "bicycle", "boat", "plane", "taxi", "tractor", "van",
                "motorcycle", "ship", "helicopter", "scooter", "tram", "jeep"),
    "profession": ("teacher", "doctor", "nurse", "farmer", "pilot", "baker", "lawyer", "chef", "mechanic",
                   "painter", "dentist", "soldier", "engineer", "writer", "singer", "judge"),
}
TRAIN_WORDS = 10

# Sentences of one topic in narrative order; a document keeps the order, so sentence order is
# learnable (SOP) and a segment from another document is recognisable (NSP).
_STORIES: dict[str, tuple[str, ...]] = {
    "animal": (
        "Early in the morning the {w} woke up in the barn.",
        "The {w} was hungry, so it looked for something to eat.",
        "The farmer gave the {w} fresh water and hay.",
        "After breakfast the {w} ran across the green field.",
        "Around noon the {w} rested in the shade of a tree.",
        "In the afternoon the children came to pet the {w}.",
        "The {w} played with a {w2} near the fence.",
        "When the sun went down the {w} walked back to the barn.",
        "At night the {w} fell asleep on the straw.",
    ),
    "food": (
        "On Monday we went to the market to buy {w}.",
        "The seller said the {w} was fresh from the farm.",
        "We paid two coins for the {w} and carried it home.",
        "At home mother washed the {w} in cold water.",
        "Then she cooked the {w} with a little salt.",
        "We also made some {w2} to eat with it.",
        "At dinner everyone said the {w} tasted delicious.",
        "After the meal we put the rest of the {w} in the kitchen.",
        "The next day we ate the {w} again for lunch.",
    ),
    "vehicle": (
        "The old {w} stood in the garage all night.",
        "In the morning the driver started the {w}.",
        "The {w} left the station at eight o'clock.",
        "The {w} carried people along the road to the city.",
        "On the way the {w} passed a {w2}.",
        "At noon the {w} stopped to fill up with fuel.",
        "In the afternoon the {w} reached the city.",
        "The passengers got out of the {w} and thanked the driver.",
        "Late in the evening the {w} returned to the garage.",
    ),
    "profession": (
        "The {w} woke up early and had a quick breakfast.",
        "Then the {w} put on a coat and left the house.",
        "The {w} walked to work through the quiet streets.",
        "At work the {w} met a {w2} who needed help.",
        "All morning the {w} worked hard and helped many people.",
        "At lunch the {w} ate a sandwich with a colleague.",
        "In the afternoon the {w} finished the most important job.",
        "In the evening the {w} went home feeling tired.",
        "Before bed the {w} read a book about work.",
    ),
    "country": (
        "{c} is a country with a long history.",
        "The capital of {c} is {k}.",
        "Many people in {c} live in {k}.",
        "Visitors to {k} enjoy the old streets and the markets.",
        "Every year the people of {c} celebrate a holiday in {k}.",
    ),
    "counting": (
        "First we said {n0}.",
        "Then we said {n1}.",
        "Next we said {n2}.",
        "After that we said {n3}.",
        "Finally we said {n4}.",
    ),
}


def builtin_corpus(n_docs: int = 2000, seed: int = 0) -> list[str]:
    """``n_docs`` multi-sentence documents (4 to 9 sentences, about 60 tokens each), one per line.

    Six kinds of story in rotation: a day on a farm (animals), a meal (foods), a trip (vehicles), a
    working day (professions), facts about a country and its capital, and counting upwards. The
    sentences of a story keep their order, so order (SOP) and topic (NSP) are learnable.
    """
    rng = random.Random(f"encoder-corpus-{seed}")
    kinds = list(_STORIES)
    docs = []
    for i in range(n_docs):
        kind = kinds[i % len(kinds)]
        story = _STORIES[kind]
        if kind in LEXICON:
            # Each sentence names its own member of the category, so a masked word must be
            # predicted from its context (what kind of thing it is), not copied from elsewhere.
            k = rng.randint(min(4, len(story)), len(story))
            keep = sorted(rng.sample(range(len(story)), k))
            docs.append(" ".join(story[j].format(w=rng.choice(LEXICON[kind]), w2=rng.choice(LEXICON[kind]))
                                 for j in keep))
            continue
        elif kind == "country":
            c = rng.choice(sorted(CAPITALS))
            fill = {"c": c, "k": CAPITALS[c]}
        else:
            start = rng.randint(1, 90)
            fill = {f"n{j}": str(start + j) for j in range(5)}
        k = rng.randint(min(4, len(story)), len(story))
        keep = sorted(rng.sample(range(len(story)), k))
        docs.append(" ".join(story[j].format(**fill) for j in keep))
    return docs


BUILTIN_CORPORA = {"encoder-corpus": builtin_corpus}

_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ., ! or ? followed by space, and at line breaks."""
    out = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _SENT_RE.split(line.strip()) if s.strip())
    return out


@dataclass
class CorpusReport:
    """Counts of what was read and what was skipped (and why)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def read_json_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL file, or of a JSON file holding a list of records."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(str(path), None, f"cannot read: {e.strerror}", reason="unreadable") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), e.lineno, f"invalid JSON: {e.msg}", reason="malformed_json") from None
        if not isinstance(data, list):
            raise DataError(str(path), 1, "a .json data file must hold a list of records", reason="not_a_list")
        return [(i + 1, r) for i, r in enumerate(data)]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(path), i, f"invalid JSON: {e.msg}", reason="malformed_json") from None
        if not isinstance(rec, dict):
            raise DataError(str(path), i, f"a record must be a JSON object, got {type(rec).__name__}",
                            reason="not_an_object")
        out.append((i, rec))
    return out


def limit_records(items: list, src: SourceConfig) -> list:
    """Apply a source's ``max_records`` and ``repeat`` (whole copies, then a seeded fractional sample)."""
    if src.weight is not None:
        raise ConfigError(f"data source '{src.path}': 'weight' mixes sources by sampling, which encoder recipes "
                          "do not do; use 'repeat' to up- or down-sample a source")
    if src.max_records is not None:
        items = items[: src.max_records]
    whole, frac = divmod(src.repeat, 1.0)
    out = list(items) * int(whole)
    if frac > 0:
        rng = random.Random(f"repeat-{src.path}")
        out += rng.sample(list(items), int(round(frac * len(items))))
    return out


def _text_documents(path: Path, corpus_format: str, report: CorpusReport) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(str(path), None, f"cannot read: {e.strerror}", reason="unreadable") from None
    if corpus_format == "auto":
        blank_between = any(not lines[i].strip() and lines[i - 1].strip() and lines[i + 1].strip()
                            for i in range(1, len(lines) - 1))
        corpus_format = "paragraphs" if blank_between else "lines"
    if corpus_format == "lines":
        docs = []
        for line in lines:
            if line.strip():
                docs.append(line)
            elif line:
                report.add("whitespace_lines")
            else:
                report.add("empty_documents")  # one document per line: an empty line is an empty document
        return docs
    docs, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line)
            continue
        if line:
            report.add("whitespace_lines")
        if cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def read_documents(sources: list[SourceConfig], corpus_format: str = "auto",
                   report: CorpusReport | None = None) -> tuple[list[list[str]], CorpusReport]:
    """Documents (each a list of sentences) from ``sources``; skipped input is counted in the report."""
    report = report or CorpusReport()
    docs: list[list[str]] = []
    for src in sources:
        if src.path.startswith("builtin:"):
            name = src.path.split(":", 1)[1]
            if name not in BUILTIN_CORPORA:
                raise ConfigError(f"data source '{src.path}': no built-in corpus '{name}'; valid: "
                                  + ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA))
            texts = BUILTIN_CORPORA[name]()
        else:
            path = Path(src.path)
            if not path.is_file():
                raise ConfigError(f"data source '{src.path}': no such file")
            if path.suffix in (".jsonl", ".json"):
                texts = []
                for line, rec in read_json_records(path):
                    value = rec.get(src.text_field)
                    if not isinstance(value, str):
                        raise DataError(str(path), line, f"expected a string in field '{src.text_field}' "
                                        "(set the source's text_field)", reason="missing_field",
                                        field=src.text_field)
                    texts.append(value)
            elif path.suffix in (".txt", ".text", ""):
                texts = _text_documents(path, corpus_format, report)
            else:
                raise ConfigError(f"data source '{src.path}': encoder corpora are .txt, .jsonl or .json files "
                                  "or builtin:encoder-corpus")
        for text in limit_records(texts, src):
            sentences = split_sentences(text)
            if not sentences:
                report.add("empty_documents")
                continue
            docs.append(sentences)
    report.add("documents", len(docs))
    report.add("sentences", sum(len(d) for d in docs))
    return docs, report
