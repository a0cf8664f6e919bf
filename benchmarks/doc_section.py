"""Write a benchmark's generated section into docs/performance.md, between its own begin/end markers."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def write_section(text: str, begin: str, end: str, doc: Path = DOC) -> None:
    """Replace the text between ``begin`` and ``end`` (``text`` carries both markers); append if absent."""
    old = doc.read_text() if doc.exists() else "# Performance\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    doc.write_text(new)
