"""The attention swap report: which layers run TE attention, which stay the model's own, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["swapped", "already swapped", "kept"]


@dataclass(frozen=True)
class AttentionEntry:
    path: str
    original: str
    status: Status
    detail: str = ""
    core: str = ""

    def line(self) -> str:
        core = f" ({self.core})" if self.core else ""
        return f"  {self.path or '<root>'} ({self.original}): {self.status}{core}" + (f"; {self.detail}" if self.detail else "")


@dataclass
class AttentionSwapReport:
    model: str
    entries: list[AttentionEntry] = field(default_factory=list)
    skipped: str = ""  # why nothing was even tried (plan, device, TE)

    def by_status(self, status: Status) -> list[AttentionEntry]:
        return [e for e in self.entries if e.status == status]

    def summary(self) -> str:
        if self.skipped:
            return f"attention of {self.model} not swapped: {self.skipped}"
        swapped, again, kept = self.by_status("swapped"), self.by_status("already swapped"), self.by_status("kept")
        if not swapped and not again:
            if not kept:
                return f"no attention layers found in {self.model}: nothing changed"
            return f"no attention swapped in {self.model}: {len(kept)} layer(s) kept ({kept[0].detail})"
        text = f"swapped {len(swapped)} attention layer(s) of {self.model} to TE fused attention"
        if again:
            text += f"; {len(again)} already swapped"
        return text + (f"; {len(kept)} kept ({kept[0].detail})" if kept else "")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "skipped": self.skipped, "entries": [asdict(e) for e in self.entries]}

    def render_text(self) -> str:
        return "\n".join([f"[lightning-te-moe] attention swap: {self.summary()}", *(e.line() for e in self.entries)])
