"""How often the guard snapshots: the measured cost of a snapshot against the measured step time.

Pure arithmetic on host floats (the guard feeds it milliseconds), so it is tested without a Trainer.
A snapshot every ``interval`` steps costs ``snapshot_ms / (interval * step_ms)`` of the run; the interval
is the smallest that keeps that share under the budget (with :data:`HEADROOM` for the measurements' drift between
checks), so a rollback loses as few steps as the budget allows.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Optional

#: Recent measurements the medians are taken over.
SAMPLES = 20
#: The interval is re-checked at these growing gaps (steps), then every ``MAX_CHECK_GAP`` steps.
FIRST_CHECK, MAX_CHECK_GAP = 4, 1000
#: The share of the budget an interval is chosen for: the medians move between checks (on an H100 the realized
#: share of an interval chosen for exactly 2% drifted to 2.08% before the next check), so it is chosen with room.
HEADROOM = 0.8


class SnapshotCadence:
    """The snapshot interval: fixed (``every``), or the smallest one that keeps snapshots under ``budget``.

    Every rank must snapshot at the same steps (a rollback restores the same step everywhere), so the
    interval only changes at :meth:`check_due` steps, where the guard makes all ranks agree on it.
    """

    def __init__(self, every: Optional[int], budget: float) -> None:
        self.every = every
        self.budget = budget
        self.interval = every or 1
        self.nbytes = 0
        self._steps: deque[float] = deque(maxlen=SAMPLES)
        self._snapshots: deque[float] = deque(maxlen=SAMPLES)
        self._next_check = FIRST_CHECK

    def add_step(self, ms: float) -> None:
        """One optimizer step's wall time, without the guard's own snapshot time."""
        self._steps.append(ms)

    def add_snapshot(self, ms: float, nbytes: int) -> None:
        """One snapshot's cost: host time plus the copy's device time (an upper bound: the copy overlaps)."""
        self._snapshots.append(ms)
        self.nbytes = nbytes

    @property
    def step_ms(self) -> Optional[float]:
        return statistics.median(self._steps) if self._steps else None

    @property
    def snapshot_ms(self) -> Optional[float]:
        return statistics.median(self._snapshots) if self._snapshots else None

    def proposal(self) -> int:
        """The interval this rank's measurements ask for."""
        step_ms, snapshot_ms = self.step_ms, self.snapshot_ms
        if self.every is not None or step_ms is None or snapshot_ms is None:
            return self.interval
        return max(1, math.ceil(snapshot_ms / (HEADROOM * self.budget * max(step_ms, 1e-6))))

    def check_due(self, step: int) -> bool:
        """Whether the interval is re-checked at ``step`` (the same steps on every rank)."""
        if self.every is not None or step < self._next_check:
            return False
        self._next_check = step + min(max(step, FIRST_CHECK), MAX_CHECK_GAP)
        return True

    def cost_share(self) -> Optional[float]:
        step_ms, snapshot_ms = self.step_ms, self.snapshot_ms
        if step_ms is None or snapshot_ms is None:
            return None
        return snapshot_ms / (self.interval * max(step_ms, 1e-6))

    def stats(self) -> dict[str, Any]:
        """What a snapshot costs and how often it is taken (for decisions, metrics and the docs' measurement)."""
        share = self.cost_share()
        return {"snapshot_ms": _round(self.snapshot_ms), "snapshot_bytes": self.nbytes, "step_ms": _round(self.step_ms),
                "interval": self.interval, "cost_share": None if share is None else round(share, 5),
                "budget": self.budget, "fixed": self.every is not None}


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)
