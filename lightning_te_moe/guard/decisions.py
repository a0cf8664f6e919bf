"""Structured records of every precision decision (plan, swap, shard, step-down, rollback, stop, resume).

``DecisionLog`` keeps them in order and hands each new one to its sinks (console, JSONL audit file,
Lightning loggers, W&B); it is saved in the checkpoint so a resumed run keeps its history.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional

DecisionKind = Literal["plan", "swap", "shard", "skip", "step_down", "rollback", "hold", "stop", "resume", "promote",
                       "autotune", "snapshot", "memory"]


@dataclass(frozen=True)
class Decision:
    kind: str
    reason: str
    rule: str = ""
    from_: str = ""
    to: str = ""
    step: int = 0
    epoch: int = 0
    wall_time: float = field(default_factory=time.time)
    evidence: dict[str, Any] = field(default_factory=dict)
    environment: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("from_")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        data = dict(data)
        data["from_"] = data.pop("from", "")
        return cls(**data)

    def line(self) -> str:
        """The readable console line."""
        move = f" {self.from_} -> {self.to}" if self.from_ else (f" -> {self.to}" if self.to else "")
        rule = f" [{self.rule}]" if self.rule else ""
        return f"[lightning-te-moe] step {self.step}: {self.kind}{move}: {self.reason}{rule}"


Sink = Callable[[Decision], None]


class DecisionLog:
    """The ordered decisions of a run, fanned out to sinks as they happen."""

    def __init__(self, environment: str = "") -> None:
        self.environment = environment
        self.decisions: list[Decision] = []
        self._sinks: list[Sink] = []
        self._held: Optional[list[Decision]] = None

    def add_sink(self, sink: Sink, replay: bool = True) -> None:
        """Attach a sink; with ``replay`` it first receives the decisions made so far.

        A sink that keeps its own copy of the history (audit file, W&B table) may also define
        ``restore(decisions)``: it is called with the checkpoint's history when a run resumes.
        """
        self._sinks.append(sink)
        if replay:
            held = self._held or []
            for decision in self.decisions:
                if not any(decision is h for h in held):
                    sink(decision)

    def hold(self) -> None:
        """Keep decisions recorded from now on from the sinks until :meth:`release`, or until a checkpoint's
        history replaces them (:meth:`load_state_dict`): when a run resumes, its setup records (plan, swap) are
        superseded by the checkpoint's own, and an append-only audit file must not get them first."""
        self._held = []

    def release(self) -> None:
        """Hand the held decisions to the sinks, in order, and stop holding."""
        held, self._held = self._held or [], None
        for decision in held:
            for sink in self._sinks:
                sink(decision)

    def clear_sinks(self) -> None:
        """Detach every sink (the plugin re-attaches them for a new Trainer)."""
        self._sinks = []

    def record(self, kind: DecisionKind, reason: str, *, step: int = 0, epoch: int = 0, rule: str = "",
               from_: str = "", to: str = "", evidence: Optional[dict[str, Any]] = None) -> Decision:
        decision = Decision(kind=kind, reason=reason, rule=rule, from_=from_, to=to, step=step, epoch=epoch,
                            evidence=dict(evidence or {}), environment=self.environment)
        self.decisions.append(decision)
        if self._held is not None:
            self._held.append(decision)
            return decision
        for sink in self._sinks:
            sink(decision)
        return decision

    def count(self, kind: str) -> int:
        return sum(1 for d in self.decisions if d.kind == kind)

    def state_dict(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.decisions]

    def load_state_dict(self, records: list[dict[str, Any]]) -> None:
        """Replace the history with a checkpoint's (held decisions included: they never reach the sinks);
        sinks with a ``restore`` method get the whole history."""
        self.decisions = [Decision.from_dict(r) for r in records]
        self._held = None
        for sink in self._sinks:
            restore = getattr(sink, "restore", None)
            if restore is not None:
                restore(list(self.decisions))
