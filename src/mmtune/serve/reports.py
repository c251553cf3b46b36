"""Report directories for the web UI's Reports tab.

A report directory is any directory with a ``report.md``: ``mmtune demo`` writes
``runs/demo/report.md`` + ``loss_curves.png`` (+ ``scores.json``), ``mmtune continual`` writes
``report.md``, ``accuracy_matrix.png``, ``task_curves.png`` and ``metrics.json``. Figures the
Markdown links by relative path are inlined as ``data:`` URLs, so the page shows them where
the report puts them without the web server having to serve files from the runs directory.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPORT_FILE = "report.md"
#: JSON files shown beside a report, in this order of preference.
METRICS_FILES = ("metrics.json", "scores.json")
#: Directories never descended into while scanning (checkpoints hold no reports and are big).
SKIP_DIRS = {"checkpoints", "tb", "__pycache__", ".git", "model", "tokenizer"}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}
#: Inline figures up to this size; bigger ones stay links (and are listed under ``images``).
MAX_INLINE_BYTES = 4 * 1024 * 1024

_IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")


@dataclass
class Report:
    path: Path
    kind: str  # "continual" | "demo" | "report"
    title: str
    markdown: str  # with figures inlined
    images: list[Path] = field(default_factory=list)  # every image in the directory
    unlinked: list[Path] = field(default_factory=list)  # images the Markdown does not show
    metrics: dict | None = None


def find_reports(root: str | Path, max_depth: int = 4, limit: int = 200) -> list[Path]:
    """Directories under ``root`` (``root`` included) holding a ``report.md``, newest first.

    The walk stops ``max_depth`` levels down and after ``limit`` reports, and skips checkpoint
    and TensorBoard directories, so scanning a big runs directory stays quick.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if REPORT_FILE in filenames:
            found.append(d)
            if len(found) >= limit:
                break
        if len(d.parts) - base_depth >= max_depth:
            dirnames[:] = []
        else:
            dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS and not n.startswith("."))
    return sorted(found, key=lambda p: (p / REPORT_FILE).stat().st_mtime, reverse=True)


def report_kind(d: Path) -> str:
    if (d / "accuracy_matrix.png").is_file() or (d / "task_curves.png").is_file():
        return "continual"
    if (d / "loss_curves.png").is_file():
        return "demo"
    return "report"


def _inline(match: re.Match, base: Path) -> str:
    src = match["src"]
    if re.match(r"^[a-z]+:", src):  # already a URL (http:, data:)
        return match[0]
    p = (base / src).resolve()
    mime = IMAGE_TYPES.get(p.suffix.lower())
    if mime is None or not p.is_file() or p.stat().st_size > MAX_INLINE_BYTES:
        return f"*[figure {match['alt'] or src}: {src} is missing or too large to show]*"
    data = base64.b64encode(p.read_bytes()).decode()
    return f"![{match['alt']}](data:{mime};base64,{data})"


def read_report(d: str | Path) -> Report:
    """Read a report directory: the Markdown with its figures inlined, every image in the
    directory, and its metrics JSON (``None`` when there is none or it does not parse)."""
    d = Path(d)
    text = (d / REPORT_FILE).read_text(encoding="utf-8", errors="replace")
    first = next((ln for ln in text.splitlines() if ln.startswith("# ")), None)
    title = first[2:].strip() if first else d.name
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_TYPES and p.is_file())
    metrics = None
    for name in METRICS_FILES:
        if (d / name).is_file():
            try:
                metrics = json.loads((d / name).read_text(encoding="utf-8"))
            except ValueError:
                metrics = {"error": f"{d / name} is not valid JSON"}
            break
    linked = {(d / m["src"]).resolve() for m in _IMAGE_LINK.finditer(text)}
    md = _IMAGE_LINK.sub(lambda m: _inline(m, d), text)
    return Report(d, report_kind(d), title, md, images, [p for p in images if p.resolve() not in linked], metrics)


def report_label(d: Path, root: Path) -> str:
    """A dropdown label: the path relative to the scanned root and the kind of report."""
    try:
        rel = d.relative_to(root)
    except ValueError:
        rel = d
    return f"{rel if str(rel) != '.' else d.name}  ({report_kind(d)})"
