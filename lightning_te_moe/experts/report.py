"""The swap report: what was swapped, what was left and why (printed at setup and recorded as a decision)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["swapped", "already swapped", "kept dense", "not swappable", "filtered out"]


@dataclass(frozen=True)
class SwapEntry:
    path: str
    original: str
    status: Status
    reason: str = ""
    adapter: str = ""
    experts: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    activation: str = ""
    bias: bool = False
    fp8: bool = False
    #: The PEFT LoRA adapters the swapped experts run (name, rank, alpha, targets); empty without PEFT.
    lora: str = ""

    def line(self) -> str:
        shape = f" E={self.experts} H={self.hidden_size} I={self.intermediate_size}" if self.experts else ""
        extra = f" {self.activation}{', bias' if self.bias else ''};" if self.activation else ""
        fp8 = (" FP8 allowed;" if self.fp8 else "") if self.status == "swapped" else ""
        why = f" {self.reason}" if self.reason else ""
        lora = f" {self.lora};" if self.lora else ""
        return f"  {self.path or '<root>'} ({self.original}): {self.status}{shape};{extra}{lora}{fp8}{why}".rstrip(";")


@dataclass
class SwapReport:
    model: str
    entries: list[SwapEntry] = field(default_factory=list)

    def by_status(self, status: Status) -> list[SwapEntry]:
        return [e for e in self.entries if e.status == status]

    @property
    def swapped(self) -> list[SwapEntry]:
        return self.by_status("swapped")

    def summary(self) -> str:
        swapped, again = self.swapped, self.by_status("already swapped")
        if again and not swapped:
            return f"{len(again)} expert layer(s) of {self.model} already swapped: nothing changed"
        if not swapped:
            left = [e for e in self.entries if e.status in ("not swappable", "filtered out")]
            detail = f" ({len(left)} expert layer(s) left: see the report)" if left else ""
            return f"no MoE expert layers swapped in {self.model}{detail}: nothing changed"
        bf16 = [e for e in swapped if not e.fp8]
        kinds = sorted({e.original for e in swapped})
        text = f"swapped {len(swapped)} expert layer(s) of {self.model} ({', '.join(kinds)}) to grouped experts"
        lora = [e for e in swapped if e.lora]
        if lora:
            text += f"; {len(lora)} with PEFT LoRA adapters (run as grouped GEMMs)"
        if again:
            text += f"; {len(again)} already swapped"
        if bf16:
            text += f"; {len(bf16)} kept out of FP8 ({bf16[0].reason})"
        left = len(self.entries) - len(swapped) - len(again)
        return text + (f"; {left} other module(s) left as they are" if left else "")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "entries": [asdict(e) for e in self.entries]}

    def render_text(self) -> str:
        return "\n".join([f"[lightning-te-moe] expert swap: {self.summary()}", *(e.line() for e in self.entries)])
