"""The norm swap report: which RMSNorm modules run on TE's fused kernels, which stay the model's own and why
(printed at setup and recorded as a decision)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["swapped", "already swapped", "kept"]


@dataclass(frozen=True)
class NormEntry:
    path: str
    original: str
    status: Status
    reason: str = ""


@dataclass
class NormSwapReport:
    model: str
    entries: list[NormEntry] = field(default_factory=list)
    skipped: str = ""  # why nothing was even tried (device, TE)

    def by_status(self, status: Status) -> list[NormEntry]:
        return [e for e in self.entries if e.status == status]

    def summary(self) -> str:
        if self.skipped:
            return f"norms of {self.model} not swapped: {self.skipped}"
        swapped, again, kept = self.by_status("swapped"), self.by_status("already swapped"), self.by_status("kept")
        if not swapped:
            what = f"{len(again)} already on TE" if again else "none swapped"
            return f"RMSNorm modules of {self.model}: {what}, {len(kept)} kept: nothing changed"
        classes = Counter(e.original for e in swapped)
        text = (f"swapped {len(swapped)} RMSNorm module(s) of {self.model} to TE's fused kernels ("
                + ", ".join(f"{name} {n}" for name, n in classes.items()) + ")")
        return text + (f"; kept {len(kept)}" if kept else "")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "skipped": self.skipped, "entries": [asdict(e) for e in self.entries]}

    def render_text(self) -> str:
        """One line per (status, class, reason): how many modules and one example path."""
        groups: dict[tuple[str, str, str], list[NormEntry]] = {}
        for e in self.entries:
            groups.setdefault((e.status, e.original, e.reason), []).append(e)
        lines = [f"[lightning-te-moe] norm swap: {self.summary()}"]
        for (status, original, reason), entries in groups.items():
            lines.append(f"  {status}: {original} x{len(entries)} (e.g. {entries[0].path or '<root>'})"
                         + (f": {reason}" if reason else ""))
        return "\n".join(lines)
