"""Reading the Markdown documentation (README.md and docs/*.md) as GitHub renders it: sections, links, anchors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def section(page: Path, heading: str) -> str:
    """The text under `heading` (e.g. "## Metrics"), up to the next heading of the same level or higher."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = page.read_text().splitlines(keepends=True)
    headings = {number: _HEADING.match(line) for number, line in prose_lines("".join(lines))}
    start = next((n for n, m in headings.items() if m and lines[n - 1].rstrip() == heading), None)
    assert start is not None, f"{page.relative_to(ROOT)} has no heading {heading!r}"
    end = next(
        (n for n, m in headings.items() if m and n > start and len(m.group(1)) <= level),
        len(lines) + 1,
    )
    return "".join(lines[start : end - 1])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: formatting dropped, lower case, punctuation removed, - for space."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*|(?<!\w)_|_(?!\w))", "", text)  # emphasis, not snake_case
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on the page, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(page.read_text()):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code blocks and inline code."""
    found = []
    for number, line in prose_lines(page.read_text()):
        prose = re.sub(r"`[^`]*`", "", line)
        found += [(number, match.group(1)) for match in _LINK.finditer(prose)]
    return found
