"""The dense swap report: which linear layers run on TE, which stay as they are and why (printed at setup and
recorded as a decision). The printout groups layers by role and reason; the decision keeps every layer."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["swapped", "already swapped", "kept"]


@dataclass(frozen=True)
class DenseEntry:
    path: str
    original: str
    status: Status
    role: str
    reason: str = ""
    rule: str = ""
    in_features: int = 0
    out_features: int = 0


@dataclass
class DenseSwapReport:
    model: str
    entries: list[DenseEntry] = field(default_factory=list)
    skipped: str = ""  # why nothing was even tried (plan, device, TE)

    def by_status(self, status: Status) -> list[DenseEntry]:
        return [e for e in self.entries if e.status == status]

    @property
    def swapped(self) -> list[DenseEntry]:
        return self.by_status("swapped")

    def summary(self) -> str:
        if self.skipped:
            return f"dense layers of {self.model} not swapped: {self.skipped}"
        swapped, again, kept = self.swapped, self.by_status("already swapped"), self.by_status("kept")
        if again and not swapped:
            return f"{len(again)} dense layer(s) of {self.model} already on TE: nothing changed"
        if not swapped:
            return f"no dense layers of {self.model} swapped ({len(kept)} kept: see the report): nothing changed"
        roles = Counter(e.role for e in swapped)
        text = (f"swapped {len(swapped)} dense linear layer(s) of {self.model} to TE ("
                + ", ".join(f"{role} {n}" for role, n in roles.items()) + ")")
        if again:
            text += f"; {len(again)} already swapped"
        kept_roles = Counter(e.role for e in kept)
        return text + ("; kept: " + ", ".join(f"{role} {n}" for role, n in kept_roles.items()) if kept else "")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "skipped": self.skipped, "entries": [asdict(e) for e in self.entries]}

    def render_text(self) -> str:
        """One line per (status, role, reason): how many layers, which names, one example path."""
        groups: dict[tuple[str, str, str], list[DenseEntry]] = {}
        for e in self.entries:
            groups.setdefault((e.status, e.role, e.reason), []).append(e)
        lines = [f"[lightning-te-moe] dense swap: {self.summary()}"]
        for (status, role, reason), entries in groups.items():
            names = sorted({e.path.rpartition(".")[2] or "<root>" for e in entries})
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            what = "te.Linear under the dense recipe" if status == "swapped" else reason
            lines.append(f"  {status}: {role} x{len(entries)} ({shown}; e.g. {entries[0].path or '<root>'})"
                         + (f": {what}" if what else ""))
        return "\n".join(lines)
