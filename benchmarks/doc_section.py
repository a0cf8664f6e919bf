"""Write a benchmark's generated section into docs/performance.md, between its own begin/end markers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def write_section(text: str, begin: str, end: str, doc: Path = DOC, after: Optional[str] = None) -> None:
    """Replace the text between ``begin`` and ``end`` (``text`` carries both markers); where absent, insert it after
    the line ``after`` (another section's end marker) if the doc has it, else append it."""
    old = doc.read_text() if doc.exists() else "# Performance\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + text + old[old.index(end) + len(end):]
    elif after is not None and after in old:
        cut = old.index(after) + len(after)
        new = old[:cut] + "\n\n" + text + old[cut:]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    doc.write_text(new)
