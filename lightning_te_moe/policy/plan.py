"""The result of the policy: which recipe dense layers and experts start on, the ladder of fallbacks, and why."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .environment import Environment
from .recipes import GEMM_PATH_TEXT, RecipeSpec


@dataclass(frozen=True)
class Reason:
    """One explained decision, naming the rule (or the user's request) that produced it."""

    rule: str
    text: str
    ref: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "text": self.text, "ref": self.ref}


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: the recipe for dense layers and the one for expert GEMMs, and the GEMM path TE takes
    for the experts under it (``native``, ``split`` or ``torch``; None for a rung built by hand, not planned)."""

    dense: RecipeSpec
    experts: RecipeSpec
    experts_gemm: Optional[str] = None

    def label(self) -> str:
        dense, experts = self.dense.label(), self.experts.label()
        return dense if dense == experts else f"{dense} / experts {experts}"

    @property
    def experts_alignment(self) -> int:
        """Rows per expert block on this rung's GEMM path (the split path's where it was not planned)."""
        return self.experts.alignment_for(self.experts_gemm or "split")

    def gemm_text(self) -> str:
        """``fp8_current: native grouped GEMM, 16 rows per expert`` (the experts' recipe, path and padding)."""
        path = GEMM_PATH_TEXT[self.experts_gemm or "split"]
        pad = f", {self.experts_alignment} rows per expert" if self.experts_alignment > 1 else ""
        return f"{self.experts.label()}: {path}{pad}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"dense": self.dense.to_dict(), "experts": self.experts.to_dict()}
        if self.experts_gemm is not None:
            data.update(experts_gemm=self.experts_gemm, experts_gemm_text=GEMM_PATH_TEXT[self.experts_gemm],
                        experts_alignment=self.experts_alignment)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rung:
        return cls(RecipeSpec.from_dict(data["dense"]), RecipeSpec.from_dict(data["experts"]), data.get("experts_gemm"))


@dataclass(frozen=True)
class Plan:
    """What to run, in what order to fall back, and why. ``ladder[0]`` is where training starts."""

    ladder: tuple[Rung, ...]
    environment: Environment
    reasons: tuple[Reason, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)
    fused_attention: bool = False
    request: dict[str, Any] = field(default_factory=dict)
    cuda_graphs: bool = False  # decoder layers replayed as CUDA graphs (the request's, or the rules' default)
    graphed_recompute: bool = False  # a step out of memory first recomputes inside the graphs (memory.py)

    @property
    def dense(self) -> RecipeSpec:
        return self.ladder[0].dense

    @property
    def experts(self) -> RecipeSpec:
        return self.ladder[0].experts

    @property
    def experts_gemm(self) -> Optional[str]:
        """How TE runs the experts' GEMMs on the first rung: ``native``, ``split`` or ``torch``."""
        return self.ladder[0].experts_gemm

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense.to_dict(),
            "experts": self.experts.to_dict(),
            "experts_gemm": self.experts_gemm,
            "ladder": [r.to_dict() for r in self.ladder],
            "env_vars": dict(self.env_vars),
            "fused_attention": self.fused_attention,
            "cuda_graphs": self.cuda_graphs,
            "graphed_recompute": self.graphed_recompute,
            "reasons": [r.to_dict() for r in self.reasons],
            "request": dict(self.request),
            "environment": self.environment.to_dict(),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            ladder=tuple(Rung.from_dict(r) for r in data["ladder"]),
            environment=Environment.from_dict(data["environment"]),
            reasons=tuple(Reason(**r) for r in data.get("reasons", ())),
            env_vars=dict(data.get("env_vars") or {}),
            fused_attention=bool(data.get("fused_attention", False)),
            request=dict(data.get("request") or {}),
            cuda_graphs=bool(data.get("cuda_graphs", (data.get("request") or {}).get("cuda_graphs"))),
            graphed_recompute=bool(data.get("graphed_recompute", False)),
        )

    def summary(self) -> str:
        """One line: start recipe and ladder."""
        return " -> ".join(r.label() for r in self.ladder)

    def render(self, experts: bool = True) -> Any:
        """A rich renderable: the chosen recipes, the ladder, and every reason. ``experts=False`` (a model without
        swapped MoE experts) leaves out the experts row. Every cell is plain text: rich markup would eat
        ``[te]`` in ``pip install 'lightning-te-moe[te]'``."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        head = Table(title="lightning-te-moe precision plan", show_header=False, title_justify="left")
        head.add_column(style="bold")
        head.add_column()
        rows = [("environment", self.environment.summary()), ("dense layers", self.dense.label())]
        start = self.ladder[0]
        if experts:
            align = start.experts_alignment
            pad = f"tokens per expert padded to {align}" if align > 1 else "no padding"
            path = f"{GEMM_PATH_TEXT[start.experts_gemm]}, " if start.experts_gemm else ""
            rows.append(("experts", f"{self.experts.label()} ({path}{pad})"))
        rows.append(("ladder", " -> ".join(r.label() for r in self.ladder)))
        if experts and any(r.experts_gemm for r in self.ladder):
            rows.append(("experts GEMM", "; ".join(dict.fromkeys(r.gemm_text() for r in self.ladder))))
        rows.append(("attention", "TE fused" if self.fused_attention else "model's own"))
        if self.environment.device_type == "cuda":
            rows.append(("CUDA graphs", "decoder layers replayed as CUDA graphs" if self.cuda_graphs else "off"))
            if self.cuda_graphs:
                rows.append(("out of memory", "recompute inside the graphs, then eager checkpointing"
                             if self.graphed_recompute else "graphs off, then eager checkpointing"))
        if self.env_vars:
            rows.append(("env vars", ", ".join(f"{k}={v}" for k, v in self.env_vars.items())))
        for name, value in rows:
            head.add_row(Text(name), Text(value))
        why = Table(title="why", title_justify="left")
        why.add_column("rule", style="cyan", no_wrap=True)
        why.add_column("reason")
        why.add_column("reference", style="dim")
        for reason in self.reasons:
            why.add_row(Text(reason.rule), Text(reason.text), Text(reason.ref))
        return Group(head, why)

    def render_text(self, width: int = 120, experts: bool = True) -> str:
        """The rendered table as plain text (logs, tests)."""
        import io

        from rich.console import Console

        console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
        console.print(self.render(experts))
        return console.export_text()
