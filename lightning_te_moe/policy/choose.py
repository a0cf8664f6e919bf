"""Environment + the user's wishes -> a ``Plan``, using only the rules table and the measurements table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .environment import Environment
from .measurements import ExpertLayerMeasurement, measured_for
from .plan import Plan, Reason, Rung
from .recipes import GEMM_PATH_TEXT, RECIPE_NAMES, RecipeSpec, spec_from_te_recipe
from .rules import Effect, Rule, matching_rules

#: Where each recipe steps down to when it is forbidden and ``strict=False`` (and for experts when
#: their GEMMs cannot run the dense recipe): the next more conservative recipe.
STEP_DOWN: dict[str, tuple[str, ...]] = {
    "nvfp4": ("mxfp8", "fp8_current", "bf16", "fp32"),
    "mxfp8": ("fp8_current", "bf16", "fp32"),
    "fp8_block": ("fp8_current", "bf16", "fp32"),
    "fp8_delayed": ("fp8_current", "bf16", "fp32"),
    "fp8_current": ("bf16", "fp32"),
    "bf16": ("fp16", "fp32"),
    "fp16": ("fp32",),
    "fp32": (),
}

#: Where the per-path row alignment comes from (for the plan's reasons).
_ALIGNMENT_REF = {
    "native": "TE 2.20.2 grouped quantize kernels and grouped scale layouts (policy/recipes.py ALIGNMENT)",
    "split": "TE get_align_size_for_quantization; TE #2966 (MXFP8: 32)",
    "torch": "TE get_align_size_for_quantization (kept off TE so a step-down never changes the layout)",
}


class PlanError(ValueError):
    """A requested recipe the environment cannot run (with ``strict=True``)."""


@dataclass(frozen=True)
class PrecisionRequest:
    """What the user asked for. ``recipe`` (dense layers) is ``"auto"``, a recipe name, or a TE recipe object;
    ``experts`` is ``"auto"`` (measured fastest on this stack under ``recipe="auto"``, else the dense recipe) or a
    recipe name."""

    recipe: Union[str, Any] = "auto"
    allow: tuple[str, ...] = ()  # empty: every recipe
    deny: tuple[str, ...] = ()
    auto_nvfp4: bool = False
    prefer_stability: bool = False
    strict: bool = True
    torch_compile: bool = False
    params_dtype: str = "float32"
    experts: str = "auto"
    #: The plugin's ``cuda_graphs``: None lets the rules decide (on for one process on CUDA with TE); the plan's
    #: ``cuda_graphs`` is the outcome, and the rules that follow read it (a GPU-bound step weighs host costs less).
    cuda_graphs: Optional[bool] = None
    sharded: bool = False  # parameters sharded over several ranks (set by the plugin from the Trainer's strategy)
    processes: int = 1  # processes in the run (set by the plugin from the Trainer's world size)

    def __post_init__(self) -> None:
        if isinstance(self.recipe, str) and self.recipe != "auto":
            _check_name(self.recipe, "recipe", allow_auto=True)
        if self.experts != "auto":
            _check_name(self.experts, "experts", allow_auto=True)
        for label, names in (("allow", self.allow), ("deny", self.deny)):
            for name in names:
                _check_name(name, label)

    @property
    def named(self) -> set[str]:
        """Recipes the user names explicitly (``recipe=``, ``experts=``, ``allow=``)."""
        names = set(self.allow)
        if not isinstance(self.recipe, str):
            names.add(spec_from_te_recipe(self.recipe).name)
        elif self.recipe != "auto":
            names.add(self.recipe)
        if self.experts != "auto":
            names.add(self.experts)
        return names

    def to_dict(self) -> dict[str, Any]:
        recipe = self.recipe if isinstance(self.recipe, str) else spec_from_te_recipe(self.recipe).to_dict()
        return {
            "recipe": recipe, "allow": list(self.allow), "deny": list(self.deny), "auto_nvfp4": self.auto_nvfp4,
            "prefer_stability": self.prefer_stability, "strict": self.strict, "torch_compile": self.torch_compile,
            "params_dtype": self.params_dtype, "experts": self.experts, "cuda_graphs": self.cuda_graphs,
            "sharded": self.sharded, "processes": self.processes,
        }

    @property
    def multi_process(self) -> bool:
        return self.processes > 1 or self.sharded


def _check_name(name: str, label: str, allow_auto: bool = False) -> None:
    if name not in RECIPE_NAMES:
        valid = ("auto, " if allow_auto else "") + ", ".join(RECIPE_NAMES)
        raise ValueError(f"{label}: unknown recipe {name!r}; valid names are: {valid}")


@dataclass
class _Constraints:
    """The matched rules folded into lookups."""

    forbidden: dict[str, Reason] = field(default_factory=dict)
    experts_forbidden: dict[str, Reason] = field(default_factory=dict)
    lifted: dict[str, Reason] = field(default_factory=dict)  # forbidden unless named, and named: the warning
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    setting_reasons: dict[str, list[Reason]] = field(default_factory=dict)
    prefer: tuple[str, ...] = ()
    prefer_reason: Optional[Reason] = None
    auto_nvfp4: Optional[Reason] = None
    drop_hp_backward: Optional[Reason] = None
    hp_via: dict[str, tuple[str, Reason]] = field(default_factory=dict)
    hp_override: tuple[str, Optional[Reason]] = ("high_precision", None)
    native: dict[str, Reason] = field(default_factory=dict)  # recipe -> the rule putting its experts on the native GEMM
    bf16_grouped_mm: Optional[Reason] = None  # the rule putting BF16 experts off the native GEMM on torch grouped_mm
    split_when_set: dict[str, Reason] = field(default_factory=dict)  # setting -> the rule keeping them split
    env: dict[str, str] = field(default_factory=dict)
    env_reasons: list[Reason] = field(default_factory=list)
    fused_attention_off: Optional[Reason] = None
    graphed_recompute: Optional[tuple[bool, Reason]] = None  # the first rule saying what a step out of memory does
    notes: list[Reason] = field(default_factory=list)

    def why_forbidden(self, name: str, experts: bool = False) -> Optional[Reason]:
        return self.forbidden.get(name) or (self.experts_forbidden.get(name) if experts else None)

    def runs_here(self, experts: bool = False) -> list[str]:
        """The recipes this machine runs, whatever ``allow=``/``deny=`` say (request reasons are set last, so a
        recipe both the machine and the request rule out keeps the machine's reason)."""
        return [n for n in RECIPE_NAMES
                if (why := self.why_forbidden(n, experts)) is None or why.rule.startswith("request.")]


def _none_left(c: _Constraints, request: PrecisionRequest, experts: bool = False) -> str:
    """Why nothing is left to choose: what this machine runs, and which of the request's lists ruled that out."""
    runs = c.runs_here(experts)
    limits = [f"{label}={list(names)}" for label, names in (("allow", request.allow), ("deny", request.deny)) if names]
    return (f"this machine runs {', '.join(runs) or 'no recipe'}"
            + (f", and {' with '.join(limits)} leaves none of them" if limits and runs else ""))


def _reason(rule: Rule, env: Environment) -> Reason:
    text = rule.why
    family = rule.when.te_reports_unavailable
    if family and env.te_checks.get(family) and env.te_checks[family].reason:
        text = f"{text} TE says: {env.te_checks[family].reason}"
    return Reason(rule.id, text, rule.ref)


def cuda_graphs_for(env: Environment, request: PrecisionRequest) -> tuple[bool, Optional[Reason]]:
    """Whether the decoder layers run as CUDA graphs, and why: the user's ``cuda_graphs=``, else the first rule
    with a ``cuda_graphs`` effect (no reason where none applies: off, e.g. on the CPU)."""
    if request.cuda_graphs is not None:
        return request.cuda_graphs, Reason("request.cuda_graphs", f"cuda_graphs={request.cuda_graphs} was requested",
                                           "TEMoEPrecision(cuda_graphs=...)")
    for rule in matching_rules(env, torch_compile=request.torch_compile, params_dtype=request.params_dtype,
                               sharded=request.sharded, multi_process=request.multi_process):
        if rule.effect.cuda_graphs is not None:
            return rule.effect.cuda_graphs, _reason(rule, env)
    return False, None


def _fold(env: Environment, request: PrecisionRequest, cuda_graphs: bool) -> _Constraints:
    c = _Constraints()
    named = request.named
    for rule in matching_rules(env, torch_compile=request.torch_compile, params_dtype=request.params_dtype,
                               cuda_graphs=cuda_graphs, sharded=request.sharded,
                               multi_process=request.multi_process):
        reason, effect = _reason(rule, env), rule.effect
        if effect == Effect():  # a rule that only informs
            c.notes.append(reason)
        target = c.experts_forbidden if effect.experts_only else c.forbidden
        for name in effect.forbid:
            if effect.lifted_by_request and name in named:
                c.lifted.setdefault(name, reason)
            else:
                target.setdefault(name, reason)
        for name, values in effect.settings.items():
            c.settings.setdefault(name, {}).update(values)
            c.setting_reasons.setdefault(name, []).append(reason)
        if effect.prefer and not c.prefer:
            c.prefer, c.prefer_reason = effect.prefer, reason
        if effect.auto_nvfp4 and c.auto_nvfp4 is None:
            c.auto_nvfp4 = reason
        if effect.drop_high_precision_backward and c.drop_hp_backward is None:
            c.drop_hp_backward = reason
        for src, dst in effect.high_precision_backward_via.items():
            c.hp_via.setdefault(src, (dst, reason))
        if effect.backward_override and c.hp_override[1] is None:
            c.hp_override = (effect.backward_override, reason)
        for name in effect.native_grouped:
            c.native.setdefault(name, reason)
        if effect.bf16_grouped_mm and c.bf16_grouped_mm is None:
            c.bf16_grouped_mm = reason
        for setting in effect.split_when_set:
            c.split_when_set.setdefault(setting, reason)
        if effect.env:
            c.env.update(effect.env)
            c.env_reasons.append(reason)
        if effect.fused_attention is False and c.fused_attention_off is None:
            c.fused_attention_off = reason
        if effect.graphed_recompute is not None and c.graphed_recompute is None:
            c.graphed_recompute = (effect.graphed_recompute, reason)
    for name in request.deny:
        c.forbidden.setdefault(name, Reason("request.deny", f"{name} is in deny=", "TEMoEPrecision(deny=...)"))
    if request.allow:
        for name in RECIPE_NAMES:
            if name not in request.allow:
                c.forbidden.setdefault(name, Reason("request.allow", f"{name} is not in allow=",
                                                    "TEMoEPrecision(allow=...)"))
    return c


def make_plan(env: Environment, request: Optional[PrecisionRequest] = None) -> Plan:
    """Choose the starting recipes and the ladder for ``env``, explaining every choice."""
    request = request or PrecisionRequest()
    graphs, graphs_reason = cuda_graphs_for(env, request)
    c = _fold(env, request, graphs)
    reasons: list[Reason] = [graphs_reason] if graphs_reason is not None else []

    dense = _choose_dense(env, request, c, reasons)
    dense = _apply_settings(dense, c, reasons, user_given=not isinstance(request.recipe, str), strict=request.strict)
    experts = _choose_experts(env, request, dense, c, reasons)

    ladder = _ladder(Rung(dense, experts), c, reasons)
    if request.prefer_stability and len(ladder) > 1 and ladder[1].dense.backward_override is not None:
        reasons.append(Reason("request.prefer_stability",
                              f"prefer_stability: start on {ladder[1].label()} (high-precision backward)",
                              "TEMoEPrecision(prefer_stability=True)"))
        ladder = ladder[1:]
    ladder = [dataclasses.replace(r, experts_gemm=_gemm_path(r.experts, env, c)) for r in ladder]

    reasons.extend(_path_reasons(ladder, env, c))
    start = ladder[0]
    if start.experts_alignment > 1:
        path = start.experts_gemm or "split"
        reasons.append(Reason("grouped-gemm-alignment",
                              f"{start.experts.name} experts on {GEMM_PATH_TEXT[path]} need each expert's token count"
                              f" padded to a multiple of {start.experts_alignment}", _ALIGNMENT_REF[path]))
    used = {name for rung in ladder for name in (rung.dense.name, rung.experts.name)}
    reasons.extend(why for name, why in c.lifted.items() if name in used)
    reasons.extend(c.env_reasons)
    reasons.extend(c.notes)
    reasons.extend(_rules_out(c, reasons))
    fused = env.device_type == "cuda" and env.has_te and c.fused_attention_off is None
    if c.fused_attention_off is not None:
        reasons.append(c.fused_attention_off)
    recompute = False
    if c.graphed_recompute is not None:  # its rules apply with CUDA graphs only
        recompute, why = c.graphed_recompute
        reasons.append(why)
    return Plan(ladder=tuple(ladder), environment=env, reasons=tuple(_dedupe(reasons)), env_vars=dict(c.env),
                fused_attention=fused, request=request.to_dict(), cuda_graphs=graphs, graphed_recompute=recompute)


def experts_allowed(env: Environment, request: PrecisionRequest) -> list[str]:
    """The recipes the rules allow the experts under ``request`` (a recipe allowed only when named is allowed only
    if ``request`` names it)."""
    c = _fold(env, request, cuda_graphs_for(env, request)[0])
    return [name for name in RECIPE_NAMES if c.why_forbidden(name, experts=True) is None]


def _choose_dense(env: Environment, request: PrecisionRequest, c: _Constraints, reasons: list[Reason]) -> RecipeSpec:
    if isinstance(request.recipe, str) and request.recipe == "auto":
        return _choose_auto(request, c, reasons)
    spec = request.recipe if isinstance(request.recipe, RecipeSpec) else (
        RecipeSpec.of(request.recipe) if isinstance(request.recipe, str) else spec_from_te_recipe(request.recipe))
    return _named(spec, env, request, c, reasons, experts=False)


def _named(spec: RecipeSpec, env: Environment, request: PrecisionRequest, c: _Constraints, reasons: list[Reason],
           experts: bool) -> RecipeSpec:
    """A recipe the user named (``recipe=``, or ``experts=`` for ``experts=True``), or its step-down."""
    what, arg = ("experts recipe", "experts") if experts else ("recipe", "recipe")
    why = c.why_forbidden(spec.name, experts=experts)
    if why is None:
        reasons.append(Reason(f"request.{arg}", f"{spec.name} was requested{' for the experts' if experts else ''}"
                              " and nothing forbids it here", f"TEMoEPrecision({arg}=...)"))
        return spec
    allowed = [n for n in RECIPE_NAMES if c.why_forbidden(n, experts=experts) is None]
    if request.strict:
        raise PlanError(
            f"{what} {spec.name!r} cannot run on {env.summary()}: {why.text} [{why.rule}: {why.ref}]. "
            f"Recipes allowed here: {', '.join(allowed) or 'none'}. Pass strict=False to step down automatically."
        )
    for name in STEP_DOWN[spec.name]:
        if c.why_forbidden(name, experts=experts) is None:
            reasons.append(Reason(why.rule, f"{spec.name} was requested but {why.text} Stepped down to {name}"
                                  " (strict=False).", why.ref))
            return RecipeSpec.of(name)
    raise PlanError(f"{what} {spec.name!r} cannot run here [{why.rule}] and none of its fallbacks"
                    f" ({', '.join(STEP_DOWN[spec.name]) or 'none'}) is allowed: {_none_left(c, request, experts)}")


def _auto_skips(name: str, request: PrecisionRequest, c: _Constraints) -> Optional[Reason]:
    """Why ``auto`` passes over an allowed recipe: NVFP4 without the opt-in, delayed scaling under prefer_stability."""
    if name == "nvfp4" and not request.auto_nvfp4 and c.auto_nvfp4 is None:
        return Reason("request.auto_nvfp4", "auto skips nvfp4: NVFP4 is only chosen automatically with"
                      " auto_nvfp4=True", "TEMoEPrecision(auto_nvfp4=True)")
    if name == "fp8_delayed" and request.prefer_stability:
        return Reason("request.prefer_stability", "auto skips fp8_delayed: prefer_stability",
                      "TEMoEPrecision(prefer_stability=True)")
    return None


def _choose_auto(request: PrecisionRequest, c: _Constraints, reasons: list[Reason]) -> RecipeSpec:
    order = c.prefer or ("bf16", "fp32")
    if c.prefer_reason:
        reasons.append(c.prefer_reason)
    for name in order:
        why = c.why_forbidden(name)
        if why is not None:
            reasons.append(Reason(why.rule, f"auto skips {name}: {why.text}", why.ref))
            continue
        skip = _auto_skips(name, request, c)
        if skip is not None:
            reasons.append(skip)
            continue
        reasons.append(Reason("auto", f"auto chose {name}: the first recipe in this device's order that is allowed",
                              c.prefer_reason.ref if c.prefer_reason else ""))
        return RecipeSpec.of(name)
    raise PlanError(f"no recipe is allowed here: {_none_left(c, request)}")


def _apply_settings(spec: RecipeSpec, c: _Constraints, reasons: list[Reason], user_given: bool,
                    strict: bool) -> RecipeSpec:
    forced = c.settings.get(spec.name, {})
    changed = {k: v for k, v in forced.items() if spec.settings.get(k) != v}
    if not forced:
        return spec
    if changed and user_given and strict:
        why = c.setting_reasons[spec.name][0]
        raise PlanError(f"the {spec.name} recipe passed in has"
                        f" {', '.join(f'{k}={spec.settings.get(k)!r}' for k in changed)} but this environment needs"
                        f" {', '.join(f'{k}={v!r}' for k, v in changed.items())}: {why.text} [{why.rule}: {why.ref}]."
                        " Fix the recipe or pass strict=False.")
    reasons.extend(Reason(r.rule, f"{spec.name}: {r.text} Forced " + ", ".join(f"{k}={v}" for k, v in forced.items())
                          + ".", r.ref) for r in c.setting_reasons[spec.name])
    return RecipeSpec(spec.name, {**spec.settings, **forced})


def _choose_experts(env: Environment, request: PrecisionRequest, dense: RecipeSpec, c: _Constraints,
                    reasons: list[Reason]) -> RecipeSpec:
    if request.experts != "auto":
        spec = _named(RecipeSpec.of(request.experts), env, request, c, reasons, experts=True)
        return _apply_settings(spec, c, reasons, user_given=False, strict=False)
    measured = measured_for(env) if request.recipe == "auto" else None
    if measured is not None:
        fastest = _fastest_measured(measured, request, c, reasons)
        if fastest is not None:
            return fastest
    why = c.why_forbidden(dense.name, experts=True)
    if why is None:
        return dense
    order = [n for n in (c.prefer or ()) if n in STEP_DOWN[dense.name]] or list(STEP_DOWN[dense.name])
    for name in order:
        if c.why_forbidden(name, experts=True) is None:
            spec = _apply_settings(RecipeSpec.of(name), c, reasons, user_given=False, strict=False)
            reasons.append(Reason(why.rule, f"experts run {name} while dense layers run {dense.name}: {why.text}",
                                  why.ref))
            return spec
    raise PlanError(f"no recipe is allowed for the experts: {why.text} For the experts,"
                    f" {_none_left(c, request, experts=True)}")


def _fastest_measured(measured: ExpertLayerMeasurement, request: PrecisionRequest, c: _Constraints,
                      reasons: list[Reason]) -> Optional[RecipeSpec]:
    """The allowed recipe with the fastest measured expert layer on this stack (None: no measured one allowed)."""
    allowed = [n for n in measured.trainable_ms
               if c.why_forbidden(n, experts=True) is None and _auto_skips(n, request, c) is None]
    if not allowed:
        return None
    name = min(allowed, key=measured.trainable_ms.__getitem__)
    left_out = sorted(set(measured.trainable_ms) - set(allowed))
    text = (f"experts: auto chose {name}, the fastest allowed recipe measured on this stack ({measured.layer},"
            f" T={measured.tokens:,}, forward + backward; {measured.stack()}: {measured.table(allowed)}"
            + (f"; not allowed here: {', '.join(left_out)}" if left_out else "") + ")")
    reasons.append(Reason(measured.id, text, measured.source))
    return _apply_settings(RecipeSpec.of(name), c, reasons, user_given=False, strict=False)


def _with_hp_backward(spec: RecipeSpec, c: _Constraints, reasons: list[Reason]) -> Optional[RecipeSpec]:
    """The same recipe with a high-precision backward, or None if there is no such step for it."""
    if not spec.is_te:
        return spec
    name = spec.name
    if name in c.hp_via:
        name, why = c.hp_via[name]
        if c.why_forbidden(name) is not None:
            return None
        reasons.append(Reason(why.rule, f"{why.text} ({spec.name} -> {name} with a high-precision backward)",
                              why.ref))
        spec = _apply_settings(RecipeSpec.of(name), c, [], user_given=False, strict=False)
    override, why = c.hp_override
    if why is not None:
        reasons.append(why)
    return RecipeSpec(spec.name, {**spec.settings, "backward_override": override})


def _ladder(start: Rung, c: _Constraints, reasons: list[Reason]) -> list[Rung]:
    ladder = [start]
    if start.dense.is_te or start.experts.is_te:
        if c.drop_hp_backward is not None:
            reasons.append(c.drop_hp_backward)
        else:
            dense, experts = _with_hp_backward(start.dense, c, reasons), _with_hp_backward(start.experts, c, [])
            if dense is not None and experts is not None:
                ladder.append(Rung(dense, experts))
    quantized = start.dense if start.dense.is_te or not start.experts.is_te else start.experts
    floor = _floor(quantized.name, c)
    if floor is not None:
        ladder.append(Rung(RecipeSpec.of(floor), RecipeSpec.of(floor)))
    reasons.append(Reason("ladder", "on divergence: " + " -> ".join(r.label() for r in ladder), "docs/policy.md"))
    return ladder


def _floor(start: str, c: _Constraints) -> Optional[str]:
    """Where the ladder ends: BF16 (FP32 where BF16 is not allowed, or below an FP16 start)."""
    if start == "fp32":
        return None
    if start == "fp16":
        return "fp32"
    if start == "bf16":
        return None
    return next((name for name in ("bf16", "fp32") if c.why_forbidden(name) is None), None)


def _gemm_path(spec: RecipeSpec, env: Environment, c: _Constraints) -> str:
    """How the experts' GEMMs run under ``spec`` here: ``native``, ``split``, ``grouped_mm`` (BF16 where TE would
    run one GEMM per expert) or ``torch`` (no TE)."""
    if env.device_type != "cuda" or not env.has_te:
        return "torch"
    if spec.name in c.native and not any(spec.settings.get(k) for k in c.split_when_set):
        return "native"
    return "grouped_mm" if spec.name == "bf16" and c.bf16_grouped_mm is not None else "split"


def _path_reasons(ladder: list[Rung], env: Environment, c: _Constraints) -> list[Reason]:
    """One line per rung: the experts' GEMM path and the rule that puts them there."""
    out = []
    for rung in ladder:
        label, path = rung.experts.label(), rung.experts_gemm or "split"
        if path == "torch":
            continue
        if path == "grouped_mm":
            assert c.bf16_grouped_mm is not None
            why = c.bf16_grouped_mm
            out.append(Reason(why.rule, f"experts {label}: {GEMM_PATH_TEXT[path]}. {why.text}", why.ref))
            continue
        if path == "native":
            why = c.native[rung.experts.name]
            out.append(Reason(why.rule, f"experts {label}: {GEMM_PATH_TEXT[path]}. {why.text}", why.ref))
            continue
        setting = next((k for k in c.split_when_set if rung.experts.settings.get(k)), None)
        if setting is not None and rung.experts.name in c.native:
            why = c.split_when_set[setting]
            out.append(Reason(why.rule, f"experts {label}: {GEMM_PATH_TEXT[path]} ({setting} set). {why.text}",
                              why.ref))
            continue
        native_here = ", ".join(c.native) or "none"
        ref = "TE grouped_linear.is_module_grouped_tensor_path_supported (see the native-grouped-* rules)"
        out.append(Reason("experts-gemm-split", f"experts {label}: {GEMM_PATH_TEXT[path]}: TE's native grouped GEMM"
                          f" does not run {rung.experts.name} on this stack (native here: {native_here})", ref))
    return out


def _rules_out(c: _Constraints, reasons: list[Reason]) -> list[Reason]:
    """Every forbidding rule not yet cited, so the plan also says why the other recipes are out."""
    cited = {r.rule for r in reasons}
    out: dict[str, tuple[Reason, list[str]]] = {}
    for scope, table in (("", c.forbidden), ("experts: ", c.experts_forbidden)):
        for name, why in table.items():
            if why.rule not in cited:
                out.setdefault(scope + why.rule, (why, []))[1].append(name)
    return [Reason(why.rule, f"rules out {key.split(why.rule)[0]}{', '.join(names)}: {why.text}", why.ref)
            for key, (why, names) in out.items()]


def _dedupe(reasons: list[Reason]) -> list[Reason]:
    seen, out = set(), []
    for r in reasons:
        if (r.rule, r.text) not in seen:
            seen.add((r.rule, r.text))
            out.append(r)
    return out
