"""The expert-layer speed targets of issues 3, 5 and 11, checked against one ``moe_layer.py`` run, with the margin.

Rows are ``moe_layer.py`` results (``name``, ``tokens``, ``median_ms``, ``peak_gib``). "Trainable" rows are our
layer with one micro-batch per optimizer step (no "cached" / "frozen" suffix): the layer a training step runs.
A target whose rows were not measured in the run is reported as such, never as met. Issue 11's targets are for
the current CUDA stack (cuBLASLt >= 13.5, where TE runs FP8 current scaling natively); the run's environment
says which stack it is, and ``auto``'s experts recipe is the one ``make_plan`` gives for that environment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

from packaging.version import Version

if TYPE_CHECKING:
    from lightning_te_moe.policy.environment import Environment

HF_GROUPED = "HF grouped_mm"
OURS_BF16 = "ours BF16 (TE GroupedLinear)"
FP8_RECIPES = ("fp8_delayed", "fp8_current", "fp8_block")
#: The suffix of a row timed behind the plugin's CUDA-graph dispatcher.
GRAPHED = ", CUDA graphs"
#: Rows of the trainable layer binding one weight per expert where the plugin binds one grouped weight (an A/B): not
#: what the plugin runs, so no target reads them.
PER_EXPERT = ", one weight per expert"
#: Issue 11's targets hold on the current stack: cuBLASLt >= 13.5 (pip's torch brings 13.4, NGC containers newer).
CURRENT_CUBLASLT = "13.5"


@dataclass(frozen=True)
class Target:
    target: str
    measured: str
    #: True / False, or None where the run lacks the rows the target needs.
    met: Optional[bool]
    #: How far from the bound, in ``unit``: positive = inside it, negative = missed by that much.
    margin: Optional[float] = None
    unit: str = "ms"

    def status(self) -> str:
        """``met (+2.1 ms)``, ``missed (-2.4 ms)`` or ``not measured``."""
        if self.met is None:
            return "not measured"
        word = "met" if self.met else "missed"
        if self.margin is None:
            return word
        scale, fmt = {"ms": (1.0, "{:+.1f} ms"), "points": (100.0, "{:+.1f} points"), "x": (1.0, "{:+.2f}x"),
                      "GiB": (1.0, "{:+.1f} GiB")}[self.unit]
        return f"{word} ({fmt.format(self.margin * scale)})"


def _trainable(name: str) -> bool:
    return (name.startswith("ours ") and "cached" not in name and "frozen" not in name
            and PER_EXPERT not in name)


def _cells(rows: list[dict[str, Any]], tokens: int) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows if r["tokens"] == tokens}


def _best(cells: dict[str, dict[str, Any]], names: list[str]) -> Optional[dict[str, Any]]:
    present = [cells[n] for n in names if n in cells]
    return min(present, key=lambda r: r["median_ms"]) if present else None


def check_targets(rows: list[dict[str, Any]], env: Optional[Environment] = None) -> list[Target]:
    """Every target, evaluated on this run's rows (``env``: the run's machine, for issue 11's targets)."""
    return [_issue3(rows), _issue5_time(rows), _issue5_fp8_gain(rows), *_issue5_frozen(rows), *_issue11(rows, env)]


def _issue11(rows: list[dict[str, Any]], env: Optional[Environment]) -> list[Target]:
    goals = ("issue 11: trainable FP8 <= 16 ms at T=16,384 (cuBLASLt >= 13.5)",
             "issue 11: frozen FP8 <= 11 ms at T=16,384 (cuBLASLt >= 13.5)",
             "issue 11: auto's experts recipe not slower than BF16 at T=16,384 (cuBLASLt >= 13.5)")
    cublaslt = env.cublaslt_version if env is not None else None
    if cublaslt is None or Version(cublaslt) < Version(CURRENT_CUBLASLT):
        return [Target(goal, f"this run's cuBLASLt is {cublaslt or 'unknown'}", None) for goal in goals]
    cells = _cells(rows, 16384)
    out = []
    # The layer eagerly or as the plugin's CUDA graphs replay it inside a training step (moe_layer.py's rows).
    for goal, names, bound in ((goals[0], [f"ours {r}{g}" for r in FP8_RECIPES for g in ("", GRAPHED)], 16.0),
                               (goals[1], [f"ours {r}, frozen experts{g}" for r in FP8_RECIPES for g in ("", GRAPHED)],
                                11.0)):
        best = _best(cells, names)
        out.append(Target(goal, "not measured", None) if best is None else
                   Target(goal, f"{best['name']} {best['median_ms']:.1f} ms", best["median_ms"] <= bound,
                          bound - best["median_ms"]))
    return [*out, _auto_experts(cells, env, goals[2])]


def _auto_experts(cells: dict[str, dict[str, Any]], env: Environment, goal: str) -> Target:
    """The experts recipe ``auto`` plans for this machine, timed in this run, against our BF16 layer."""
    from lightning_te_moe.policy.choose import make_plan

    chosen = make_plan(env).experts.name
    row, bf16 = cells.get(OURS_BF16 if chosen == "bf16" else f"ours {chosen}"), cells.get(OURS_BF16)
    if row is None or bf16 is None:
        return Target(goal, f"auto plans {chosen}: its row or BF16's was not measured", None)
    measured = f"auto plans {chosen}: {row['median_ms']:.1f} ms vs BF16 {bf16['median_ms']:.1f} ms"
    return Target(goal, measured, row["median_ms"] <= bf16["median_ms"], bf16["median_ms"] - row["median_ms"])


def _issue3(rows: list[dict[str, Any]]) -> Target:
    goal = "issue 3: best recipe <= 21 ms at T=16,384 with peak <= HF grouped_mm's"
    cells = _cells(rows, 16384)
    hf = cells.get(HF_GROUPED)
    if hf is None:
        return Target(goal, "HF grouped_mm not measured", None)
    fits = [n for n in cells if _trainable(n) and cells[n]["peak_gib"] <= hf["peak_gib"]]
    best = _best(cells, fits)
    if best is None:
        return Target(goal, f"no recipe within HF's {hf['peak_gib']:.1f} GiB", False)
    measured = (f"{best['name']} {best['median_ms']:.1f} ms, {best['peak_gib']:.1f} GiB "
                f"(HF {hf['median_ms']:.1f} ms, {hf['peak_gib']:.1f} GiB)")
    return Target(goal, measured, best["median_ms"] <= 21.0, 21.0 - best["median_ms"])


def _issue5_time(rows: list[dict[str, Any]]) -> Target:
    goal = "issue 5: best recipe <= 16 ms at T=16,384 (trainable layer)"
    cells = _cells(rows, 16384)
    best = _best(cells, [n for n in cells if _trainable(n)])
    if best is None:
        return Target(goal, "our layer not measured", None)
    return Target(goal, f"{best['name']} {best['median_ms']:.1f} ms", best["median_ms"] <= 16.0,
                  16.0 - best["median_ms"])


def _issue5_fp8_gain(rows: list[dict[str, Any]]) -> Target:
    goal = "issue 5: best FP8 >= 15% faster than our BF16 at T=65,536"
    cells = _cells(rows, 65536)
    best = _best(cells, [f"ours {r}" for r in FP8_RECIPES])
    bf16 = cells.get(OURS_BF16)
    if best is None or bf16 is None:
        return Target(goal, "FP8 or BF16 row not measured", None)
    gain = 1.0 - best["median_ms"] / bf16["median_ms"]
    measured = f"{best['name']} {best['median_ms']:.1f} vs BF16 {bf16['median_ms']:.1f} ms: {gain:.1%} faster"
    return Target(goal, measured, gain >= 0.15, gain - 0.15, "points")


def _issue5_frozen(rows: list[dict[str, Any]]) -> list[Target]:
    out = []
    for tokens in sorted({r["tokens"] for r in rows if r["tokens"] >= 16384}):
        cells = _cells(rows, tokens)
        for recipe in FP8_RECIPES:
            trainable, frozen = cells.get(f"ours {recipe}"), cells.get(f"ours {recipe}, frozen experts")
            if trainable is None or frozen is None:
                continue
            ratio = trainable["median_ms"] / frozen["median_ms"]
            out.append(Target(f"issue 5: frozen {recipe} >= 1.3x trainable at T={tokens:,}",
                              f"{frozen['median_ms']:.1f} vs {trainable['median_ms']:.1f} ms: {ratio:.2f}x",
                              ratio >= 1.3, ratio - 1.3, "x"))
    return out or [Target("issue 5: frozen FP8 >= 1.3x trainable", "no FP8 frozen rows at T >= 16,384", None)]


def targets_markdown(targets: list[Target]) -> list[str]:
    """A table: target, what this run measured, and met / missed by how much."""
    return ["| target | measured | status |", "|---|---|---|",
            *(f"| {t.target} | {t.measured} | {t.status()} |" for t in targets)]


def targets_json(targets: list[Target]) -> list[dict[str, Any]]:
    return [{**asdict(t), "status": t.status()} for t in targets]
