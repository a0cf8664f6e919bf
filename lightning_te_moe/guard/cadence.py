"""How often the guard snapshots: the measured cost of a snapshot against the measured step time.

Pure arithmetic on host floats (the guard feeds it milliseconds), so it is tested without a Trainer.
A snapshot every ``interval`` steps costs ``snapshot_ms / (interval * step_ms)`` of the run; the interval
is the smallest that keeps that share under the budget (with :data:`HEADROOM` for the measurements' drift between
checks), so a rollback loses as few steps as the budget allows.

Until the first measurement there is no interval: a fit starts with the guard's verified snapshot of the
starting state (the rollback target), takes one more at the first step after it (the *probe*: the optimizer
creates its state in its first step, so this is the first snapshot of the full layout) and no other until the
first check, ``FIRST_CHECK`` steps after the start, sets the interval from the probe's cost. Snapshotting at
every warm-up step would be the costliest possible start on a large model.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Optional

#: Recent measurements the medians are taken over.
SAMPLES = 20
#: The interval is checked this many steps after the start, then at doubling gaps, then every ``MAX_CHECK_GAP``.
FIRST_CHECK, MAX_CHECK_GAP = 4, 1000
#: The share of the budget an interval is chosen for: the medians move between checks (on an H100 the realized
#: share of an interval chosen for exactly 2% drifted to 2.08% before the next check), so it is chosen with room.
HEADROOM = 0.8


class SnapshotCadence:
    """The snapshot interval: fixed (``every``), or the smallest one that keeps snapshots under ``budget``.

    Every rank must snapshot at the same steps (a rollback restores the same step everywhere), so the
    interval only changes at :meth:`check_due` steps, where the guard makes all ranks agree on it
    (:meth:`agree`); the probe's step follows from the start step and the guard's decisions, the same on
    every rank.
    """

    def __init__(self, every: Optional[int], budget: float) -> None:
        self.every = every
        self.budget = budget
        self.interval: Optional[int] = every
        self.nbytes = 0
        self.last = 0
        self._steps: deque[float] = deque(maxlen=SAMPLES)
        self._snapshots: deque[float] = deque(maxlen=SAMPLES)
        self._origin = 0
        self._next_check = FIRST_CHECK
        self._probe_due = every is None

    def start(self, step: int) -> None:
        """A fit starts at ``step``, where the guard has just taken its verified snapshot: measure afresh."""
        self.interval = self.every
        self.last = self._origin = step
        self._next_check = step + FIRST_CHECK
        self._probe_due = self.every is None
        self._steps.clear()
        self._snapshots.clear()

    def add_step(self, ms: float) -> None:
        """One optimizer step's wall time, without the guard's own snapshot time."""
        self._steps.append(ms)

    def add_snapshot(self, ms: float, nbytes: int) -> None:
        """One snapshot's cost: host time plus the copy's device time (an upper bound: the copy overlaps).

        A snapshot of another size than the last one (the optimizer created its state, a step-down changed
        TE's scaling state) starts the measurements again: the earlier costs were of a different copy.
        """
        if nbytes != self.nbytes:
            self._snapshots.clear()
            self.nbytes = nbytes
        self._snapshots.append(ms)

    @property
    def step_ms(self) -> Optional[float]:
        return statistics.median(self._steps) if self._steps else None

    @property
    def snapshot_ms(self) -> Optional[float]:
        return statistics.median(self._snapshots) if self._snapshots else None

    def due(self, step: int) -> bool:
        """Whether the state after ``step`` is to be snapshot: every ``interval`` steps once there is one;
        before, only the probe, at the first step after the start it can be taken."""
        if self.interval is not None:
            return step - self.last >= self.interval
        return self._probe_due and step > self._origin

    def mark(self, step: int) -> None:
        """The guard holds the state after ``step`` (a snapshot was taken, or a rollback restored it there)."""
        self.last = step
        self._probe_due = False

    def proposal(self) -> Optional[int]:
        """The interval this rank's measurements ask for; None while a step or a snapshot is not measured yet."""
        if self.every is not None:
            return self.every
        step_ms, snapshot_ms = self.step_ms, self.snapshot_ms
        if step_ms is None or snapshot_ms is None:
            return None
        return max(1, math.ceil(snapshot_ms / (HEADROOM * self.budget * max(step_ms, 1e-6))))

    def agree(self, interval: Optional[int]) -> None:
        """The interval all ranks agreed on. None: nothing was measured yet anywhere; no interval still, and a probe
        is due again (a rollback may have taken the place of the first)."""
        self.interval = interval
        if interval is None:
            self._probe_due = True

    def check_due(self, step: int) -> bool:
        """Whether the interval is re-checked at ``step`` (the same steps on every rank)."""
        if self.every is not None or step < self._next_check:
            return False
        self._next_check = step + min(max(step - self._origin, FIRST_CHECK), MAX_CHECK_GAP)
        return True

    def cost_share(self) -> Optional[float]:
        step_ms, snapshot_ms = self.step_ms, self.snapshot_ms
        if step_ms is None or snapshot_ms is None or self.interval is None:
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
