"""The docs in the repository stay true to the tree (issue 12, item 6).

- README.md's layout section is what ``tools/readme_layout.py`` generates from the source tree
  (run ``python tools/readme_layout.py`` to refresh it);
- no file cites the project's private notes, which are not part of the repository: a fact the code
  relies on is written in docs/ (docs/reference/) or cited to its paper;
- every ``docs/PAGE.md#anchor`` cited in src/, tests/, benchmarks/, tools/, README.md or docs/ names
  an existing page and one of its headings (GitHub's anchor rules).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "tests", "benchmarks", "tools")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg"}

# The private notes' file names, assembled so that this file does not match its own pattern.
PRIVATE = re.compile(r"\b(?:" + "REFER" + r"ENCE|" + "STY" + r"LE)(?:\.md\b|:|\s+section\b)")
DOC_LINK = re.compile(r"\bdocs/((?:[\w.-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")


def _load_layout_tool():
    spec = importlib.util.spec_from_file_location("readme_layout", ROOT / "tools" / "readme_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_files():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation dropped (hyphens and underscores kept),
    spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The heading ids of a Markdown page (fenced code skipped; repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_github_anchor_rules():
    assert github_anchor("Phi-4 dynamic crops") == "phi-4-dynamic-crops"
    assert github_anchor("Accuracy matrix and metrics") == "accuracy-matrix-and-metrics"
    assert github_anchor("Images (tiling: phi4)") == "images-tiling-phi4"
    assert github_anchor("`mmtune data check`: every record") == "mmtune-data-check-every-record"


def test_readme_layout_is_current():
    tool = _load_layout_tool()
    _, section, _ = tool.split_readme((ROOT / "README.md").read_text(encoding="utf-8"))
    assert section == tool.render(), (
        "README.md's layout section is stale: run `python tools/readme_layout.py` (or `make readme-layout`)")


def test_layout_lists_every_module_with_its_summary():
    tool = _load_layout_tool()
    text = tool.render()
    modules = [p for p in (ROOT / "src" / "mmtune").rglob("*.py") if p.name != "__init__.py"]
    assert modules
    for path in modules:
        assert re.search(rf"^\s+{re.escape(path.name)}\b", text, re.M), path
    # a summary is the first sentence, without Sphinx roles
    assert tool.summary("A thing (e.g. this). More words.\n\nSecond paragraph.") == "A thing (e.g. this)"
    assert tool.summary("Uses :class:`~a.b.Model` and :mod:`a.b`.") == "Uses `Model` and `a.b`"


def test_no_file_cites_the_private_notes():
    offenders = []
    for path in _text_files():
        if path == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, ("cite docs/reference/PAGE.md#section or the paper instead:\n" + "\n".join(offenders))


def test_private_note_pattern_matches_citations_only():
    ref, sty = "REFER" + "ENCE", "STY" + "LE"
    for cited in (f"({ref}.md section 4)", f"{ref} section 1", f"({sty}: one function)", f"{sty}.md"):
        assert PRIVATE.search(cited), cited
    for fine in (f"{ref}_COUNTS = {{", f"{sty}_SHEET", "reference numbers"):
        assert not PRIVATE.search(fine), fine


def _doc_links():
    for path in _text_files():
        if path == Path(__file__).resolve():  # its docstrings name the pattern, not a page
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in DOC_LINK.finditer(line):
                yield f"{path.relative_to(ROOT)}:{lineno}", m.group(1), m.group(2)


def test_docs_links_point_to_existing_pages_and_headings():
    links = list(_doc_links())
    assert any(anchor for _, _, anchor in links), "expected docstrings citing docs/...md#anchor"
    broken = []
    cache: dict[str, set[str]] = {}
    for where, page, anchor in links:
        target = ROOT / "docs" / page
        if not target.is_file():
            broken.append(f"{where}: docs/{page} does not exist")
            continue
        if anchor:
            ids = cache.setdefault(page, anchors(target))
            if anchor not in ids:
                broken.append(f"{where}: docs/{page} has no heading #{anchor} (has: {', '.join(sorted(ids))})")
    assert not broken, "\n".join(broken)


def test_relative_links_inside_docs_resolve():
    broken = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for m in re.finditer(r"\]\((?!https?:|#)([^)#\s]+)(?:#([\w-]+))?\)", page.read_text(encoding="utf-8")):
            target = (page.parent / m.group(1)).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {m.group(1)}")
            elif m.group(2) and target.suffix == ".md" and m.group(2) not in anchors(target):
                broken.append(f"{page.relative_to(ROOT)}: {m.group(1)}#{m.group(2)}")
    assert not broken, "\n".join(broken)

