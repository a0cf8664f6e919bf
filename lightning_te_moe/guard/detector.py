"""Pure divergence detection on host floats: non-finite values at once, robust windowed spikes with patience.

No torch, no Lightning: the guard feeds it one (loss, grad norm) pair per optimizer step, and the tests
feed it synthetic sequences.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from .config import GuardConfig

#: Scale that makes the median absolute deviation a standard-deviation estimate for normal noise.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Trigger:
    """Why a step was called divergent, with the numbers that decided it."""

    rule: str
    step: int
    value: float
    median: float = math.nan
    spread: float = math.nan
    threshold: float = math.nan
    streak: int = 0

    @property
    def nonfinite(self) -> bool:
        return self.rule.startswith("nonfinite")

    def evidence(self) -> dict[str, Any]:
        return {k: _json_float(v) for k, v in vars(self).items()}

    def describe(self) -> str:
        if self.nonfinite:
            return f"{self.rule.split('_', 1)[1].replace('_', ' ')} is {self.value} at step {self.step}"
        name = self.rule.removesuffix("_spike").replace("_", " ")
        return (f"{name} {self.value:.4g} above {self.threshold:.4g} (median {self.median:.4g} + sigma x"
                f" spread {self.spread:.3g}) for {self.streak} steps, last at step {self.step}")


def _json_float(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class SeriesWatch:
    """One watched series (loss or gradient norm): a window of healthy ``(step, value)`` and a streak of outliers.

    ``seen`` counts the healthy values behind the window; spike rules apply once it exceeds ``warmup``.
    """

    def __init__(self, name: str, sigma: float, config: GuardConfig) -> None:
        self.name = name
        self.sigma = sigma
        self.config = config
        self.window: deque[tuple[int, float]] = deque(maxlen=config.window)
        self.seen = 0
        self.streak = 0
        self.last: tuple[int, float] = (0, math.nan)

    def stats(self) -> tuple[float, float]:
        """Median and robust spread of the window."""
        values = sorted(v for _, v in self.window)
        median = _median(values)
        mad = _median(sorted(abs(v - median) for v in values))
        return median, max(MAD_TO_SIGMA * mad, self.config.min_rel_spread * abs(median))

    def update(self, step: int, value: float) -> Optional[Trigger]:
        self.last = (step, value)
        if not math.isfinite(value):
            return Trigger(f"nonfinite_{self.name}", step, value)
        if self.seen < self.config.warmup or not self.window:
            self._accept(step, value)
            return None
        median, spread = self.stats()
        threshold = median + self.sigma * spread
        if value <= threshold:
            self.streak = 0
            self._accept(step, value)
            return None
        self.streak += 1
        if self.streak < self.config.patience:
            return None
        return self.streak_trigger()

    def streak_trigger(self) -> Trigger:
        """The spike trigger for the current streak (at ``patience``, or judged early, before a checkpoint)."""
        median, spread = self.stats()
        step, value = self.last
        return Trigger(f"{self.name}_spike", step, value, median, spread, median + self.sigma * spread, self.streak)

    def _accept(self, step: int, value: float) -> None:
        self.window.append((step, value))
        self.seen += 1

    def rollback_to(self, step: int) -> None:
        """Forget values from after ``step``; with too few left, warm up again."""
        kept = [(s, v) for s, v in self.window if s <= step]
        dropped = len(self.window) - len(kept)
        self.window = deque(kept, maxlen=self.config.window)
        # a non-empty remainder spans ``step``, so every value after it was in the window and is dropped
        self.seen = self.seen - dropped if kept else 0
        self.streak = 0

    def state_dict(self) -> dict[str, Any]:
        return {"window": [list(sv) for sv in self.window], "seen": self.seen, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = deque((tuple(sv) for sv in state["window"]), maxlen=self.config.window)
        self.seen, self.streak = int(state["seen"]), int(state["streak"])


def _median(values: list[float]) -> float:
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else 0.5 * (values[mid - 1] + values[mid])


class DivergenceDetector:
    """Watches the loss and (optionally) the gradient norm; ``update`` returns a Trigger or None."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.series = {"loss": SeriesWatch("loss", config.loss_sigma, config)}
        if config.watch_grad_norm:
            self.series["grad_norm"] = SeriesWatch("grad_norm", config.grad_norm_sigma, config)

    def update(self, step: int, loss: Optional[float], grad_norm: Optional[float]) -> Optional[Trigger]:
        """Feed one optimizer step; None values (not measured this step) are skipped."""
        triggers = []
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is not None and name in self.series:
                trigger = self.series[name].update(step, value)
                if trigger is not None:
                    triggers.append(trigger)
        if not triggers:
            return None
        return next((t for t in triggers if t.nonfinite), triggers[0])

    @property
    def in_streak(self) -> bool:
        """Some series is above its threshold but not yet for ``patience`` steps."""
        return any(s.streak for s in self.series.values())

    def open_streak(self) -> Optional[Trigger]:
        """A series above its threshold for fewer than ``patience`` steps, as the trigger it would make now."""
        return next((s.streak_trigger() for s in self.series.values() if s.streak), None)

    def rollback_to(self, step: int) -> None:
        """After a rollback to ``step``: the window keeps only values the restored weights had seen."""
        for series in self.series.values():
            series.rollback_to(step)

    def reset_window(self) -> None:
        """After a response without rollback: the level may have moved, so learn it again (with warm-up)."""
        for name, series in self.series.items():
            self.series[name] = SeriesWatch(name, series.sigma, self.config)

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.series.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, series_state in state.items():
            if name in self.series:
                self.series[name].load_state_dict(series_state)
