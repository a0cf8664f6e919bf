"""Measured ``auto``: time the recipes the policy allows on the model's real expert shapes, keep the fastest.

Only recipes that the rules already allow are timed (never a recipe "to see if it works"); the timing
function is injected, so the choice logic is tested on CPU with made-up timings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .environment import Environment
from .plan import Plan, Reason
from .policy import PlanError, PrecisionRequest, make_plan
from .recipes import RECIPE_NAMES, RecipeSpec

#: A challenger must beat the rule-based choice by this fraction to replace it (timing noise).
MARGIN = 0.03


@dataclass(frozen=True)
class AutotuneResult:
    timings_ms: dict[str, float]
    rule_choice: str
    chosen: str
    reason: str


def candidate_plans(env: Environment, request: PrecisionRequest) -> dict[str, Plan]:
    """The plan that each allowed, speed-relevant recipe would give (the rule-based choice first)."""
    base = make_plan(env, request)
    plans = {base.dense.name: base}
    for name in RECIPE_NAMES:
        if name in plans or name in ("fp32", "fp16") or (name == "nvfp4" and not request.auto_nvfp4):
            continue
        if request.prefer_stability and name == "fp8_delayed":
            continue
        try:
            plans[name] = make_plan(env, dataclasses.replace(request, recipe=name, strict=True))
        except PlanError:
            continue
    return plans


def choose(timings_ms: dict[str, float], rule_choice: str, margin: float = MARGIN) -> tuple[str, str]:
    """The fastest recipe, unless it does not beat the rule-based one by ``margin``; and why."""
    if rule_choice not in timings_ms:
        raise ValueError(f"no timing for the rule-based choice {rule_choice!r}: got {sorted(timings_ms)}")
    fastest = min(timings_ms, key=timings_ms.__getitem__)
    table = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(timings_ms.items(), key=lambda kv: kv[1]))
    if fastest != rule_choice and timings_ms[fastest] < timings_ms[rule_choice] * (1 - margin):
        gain = 1 - timings_ms[fastest] / timings_ms[rule_choice]
        return fastest, f"autotune chose {fastest}: {gain:.0%} faster than the rule-based {rule_choice} ({table})"
    return rule_choice, f"autotune kept {rule_choice}: nothing was more than {margin:.0%} faster ({table})"


def autotune_plan(env: Environment, request: PrecisionRequest,
                  time_experts: Callable[[RecipeSpec], float]) -> tuple[Plan, AutotuneResult]:
    """Time each candidate's expert recipe with ``time_experts(spec) -> ms`` and plan on the fastest."""
    if request.recipe != "auto":
        raise ValueError(f"autotune needs recipe='auto' (got {request.recipe!r}): a named recipe is not re-chosen")
    plans = candidate_plans(env, request)
    timings = {name: float(time_experts(plan.experts)) for name, plan in plans.items()}
    rule_choice = next(iter(plans))
    chosen, why = choose(timings, rule_choice)
    plan = plans[chosen]
    reasons = tuple(r for r in plan.reasons if r.rule != "request.recipe")  # the user asked for auto, not this
    plan = dataclasses.replace(plan, reasons=reasons + (Reason("autotune", why, "TEMoEPrecision(autotune=True)"),),
                               request={**plans[rule_choice].request, "autotune": True})
    return plan, AutotuneResult(timings, rule_choice, chosen, why)
