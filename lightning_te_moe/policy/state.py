"""The active rung of the plan, shared by the plugin, the swapped modules and the divergence guard."""

from __future__ import annotations

from typing import Any, Callable, Optional

from .plan import Plan, Rung
from .recipes import RecipeSpec


class PrecisionState:
    """Which rung of ``plan.ladder`` is active, and the TE recipe objects for it (built lazily, once).

    Modules that run their own TE ``autocast`` (the expert GEMMs) read ``experts`` from here on every
    forward, so a step-down takes effect from the next step without touching the modules.
    """

    def __init__(self, plan: Plan, index: int = 0) -> None:
        self.plan = plan
        self._index = 0
        self._built: dict[RecipeSpec, Any] = {}
        self._listeners: list[Callable[[Rung, Rung], None]] = []
        self.set_index(index)

    @property
    def index(self) -> int:
        return self._index

    @property
    def rung(self) -> Rung:
        return self.plan.ladder[self._index]

    @property
    def dense(self) -> RecipeSpec:
        return self.rung.dense

    @property
    def experts(self) -> RecipeSpec:
        return self.rung.experts

    @property
    def delayed_scaling(self) -> bool:
        """The rung runs TE's delayed scaling (dense or experts): its recompute must reuse the forward's scales."""
        return "fp8_delayed" in (self.dense.name, self.experts.name)

    @property
    def can_step_down(self) -> bool:
        return self._index + 1 < len(self.plan.ladder)

    def te_recipe(self, spec: RecipeSpec) -> Any:
        """The TE recipe object for ``spec`` (None for plain dtypes); one object per spec for the run."""
        if not spec.is_te:
            return None
        if spec not in self._built:
            self._built[spec] = spec.build()
        return self._built[spec]

    def on_change(self, listener: Callable[[Rung, Rung], None]) -> None:
        """Call ``listener(old, new)`` whenever the rung changes."""
        self._listeners.append(listener)

    def set_index(self, index: int) -> None:
        if not 0 <= index < len(self.plan.ladder):
            raise ValueError(f"rung {index} is outside the ladder (0..{len(self.plan.ladder) - 1}): {self.plan.summary()}")
        old, self._index = self.plan.ladder[self._index], index
        if old != self.rung:
            for listener in self._listeners:
                listener(old, self.rung)

    def step_down(self) -> Optional[Rung]:
        """Move one rung down; returns the new rung, or None at the bottom."""
        if not self.can_step_down:
            return None
        self.set_index(self._index + 1)
        return self.rung
