"""Measured ``auto``: time the experts recipes the policy allows on the model's real expert shapes, keep the fastest.

Only recipes that the rules already allow are timed (never a recipe "to see if it works"); the timing
function is injected, so the choice logic is tested on CPU with made-up timings.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .choose import PlanError, PrecisionRequest, experts_allowed, make_plan
from .environment import Environment
from .plan import Plan, Reason

#: A challenger must beat the rule-based choice by this fraction to replace it (timing noise).
MARGIN = 0.03


@dataclass(frozen=True)
class AutotuneResult:
    timings_ms: dict[str, float]
    rule_choice: str
    chosen: str
    reason: str


def candidate_plans(env: Environment, request: PrecisionRequest) -> dict[str, Plan]:
    """The plan each allowed, speed-relevant experts recipe would give, keyed by that recipe (the rule-based
    choice first). Only the experts' recipe varies: the dense layers keep the rule-based choice."""
    base = make_plan(env, request)
    plans = {base.experts.name: base}
    for name in experts_allowed(env, request):
        if name in plans or name in ("fp32", "fp16") or (name == "nvfp4" and not request.auto_nvfp4):
            continue
        if request.prefer_stability and name == "fp8_delayed":
            continue
        try:
            plans[name] = make_plan(env, dataclasses.replace(request, experts=name, strict=True))
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
                  time_plan: Callable[[Plan], float]) -> tuple[Plan, AutotuneResult]:
    """Time each candidate plan's first rung with ``time_plan(plan) -> ms`` and plan on the fastest experts recipe."""
    if request.recipe != "auto" or request.experts != "auto":
        raise ValueError(f"autotune needs recipe='auto' and experts='auto' (got {request.recipe!r},"
                         f" {request.experts!r}): a named recipe is not re-chosen")
    plans = candidate_plans(env, request)
    timings = {name: float(time_plan(plan)) for name, plan in plans.items()}
    rule_choice = next(iter(plans))
    chosen, why = choose(timings, rule_choice)
    plan = plans[chosen]
    reasons = tuple(r for r in plan.reasons if r.rule != "request.experts")  # the user asked for auto, not this
    plan = dataclasses.replace(plan, reasons=reasons + (Reason("autotune", why, "TEMoEPrecision(autotune=True)"),),
                               request={**plans[rule_choice].request, "autotune": True})
    return plan, AutotuneResult(timings, rule_choice, chosen, why)


def time_experts(module: Any, plan: Plan, tokens: int, top_k: int, steps: int = 5, warmup: int = 2) -> float:
    """Median forward + backward milliseconds of one swapped experts module under ``plan``'s first rung.

    Random tokens and routing at the module's real shapes; gradients are returned, not accumulated, so the
    module's ``.grad`` is untouched. Runs the same autocasts the plugin's forward context enters. Trainable
    expert weights are re-quantized on every timed step, as an optimizer step between forwards makes TE do
    (the timed steps do not change them, so TE's cached FP8 copy would otherwise look free); frozen ones keep
    their cached copy, as in training.
    """
    import transformer_engine.pytorch as te

    from .state import PrecisionState

    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, module.hidden_size, device=device, generator=gen).bfloat16().requires_grad_(True)
    weights, index = torch.rand(tokens, module.num_experts, device=device, generator=gen).topk(top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).bfloat16()
    params = [p for p in module.parameters() if p.requires_grad]
    trial, saved = PrecisionState(plan), module.state
    module.state = trial
    times = []
    try:
        for i in range(warmup + steps):
            if module.fc1.weight.requires_grad:
                module.invalidate_quantized_weights()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.autocast("cuda", dtype=trial.dense.compute_dtype), \
                    te.autocast(enabled=trial.dense.is_te, recipe=trial.te_recipe(trial.dense)):
                out = module(x, index, weights)
            torch.autograd.grad(out.float().square().mean(), [x, *params])
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    finally:
        module.state = saved
    return statistics.median(times)


def autotune_model(model: torch.nn.Module, env: Environment, request: PrecisionRequest, tokens: int,
                   steps: int = 5) -> tuple[Plan, AutotuneResult, dict[str, Any]]:
    """Time the allowed recipes on the model's largest swapped experts module; raises ValueError with the reason
    when there is nothing to time (no GPU/TE, a named recipe, no FP8-capable swapped experts)."""
    from ..experts import GroupedExperts

    if env.device_type != "cuda" or not env.has_te:
        raise ValueError(f"autotune needs a CUDA device with Transformer Engine; this is {env.summary()}")
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts) and m.fp8_reason is None]
    if not experts:
        raise ValueError("autotune found no swapped experts module that can run FP8 to time")
    module = max(experts, key=lambda m: sum(p.numel() for p in m.parameters()))
    top_k = next((c.num_experts_per_tok for c in (getattr(m, "config", None) for m in model.modules())
                  if getattr(c, "num_experts_per_tok", None)), 2)
    plan, result = autotune_plan(env, request, lambda p: time_experts(module, p, tokens, top_k, steps=steps))
    shape = {"num_experts": module.num_experts, "hidden_size": module.hidden_size,
             "intermediate_size": module.intermediate_size, "tokens": tokens, "top_k": top_k}
    return plan, result, shape
