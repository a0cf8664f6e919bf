"""Issue 12's full-model targets, checked on one CUDA stack's rows of ``full_model.py``, with the margin.

A row is one (implementation, fine-tune, shape) of ``full_model.py``: ``row`` (implementation key), ``finetune``,
``shape`` (``"1x1024"`` = batch 1 x seq 1,024), ``status`` (``ok`` / ``oom`` / ``error``), ``device``, and for ``ok``
rows ``median_ms``, ``peak_gib``, ``gpu_busy``. The plugin's default plan is compared with the reference
(transformers grouped_mm experts + flex attention) at the same fine-tune and shape, on the same GPU. A target whose
rows the run lacks is reported as not measured, never as met.
"""

from __future__ import annotations

from typing import Any, Optional

from moe_targets import Target

REFERENCE = "flex"
DEFAULT_PLAN = "plugin-default"
SHAPES = ("1x1024", "1x2048", "1x4096", "8x1024")
SPEED_GOALS = (("1x1024", 1.5), ("1x2048", 2.0))
LONG_SHAPE = "1x4096"
BUSY_GOAL = 0.85

Cells = dict[tuple[str, str], dict[str, Any]]


def shape_label(shape: str) -> str:
    """``"8x1024"`` -> ``"8 x 1,024"``."""
    batch, seq = shape.split("x")
    return f"{int(batch)} x {int(seq):,}"


def outcome(row: dict[str, Any]) -> str:
    """A row in a few words: its step time, ``out of memory`` or the failure."""
    if row["status"] == "ok":
        return f"{row['median_ms']:.1f} ms"
    return "out of memory" if row["status"] == "oom" else f"failed ({row['error']})"


def speedup(row: Optional[dict[str, Any]], reference: Optional[dict[str, Any]]) -> Optional[float]:
    """Reference step time / this row's, where both ran on the same GPU."""
    if row is None or reference is None or row["status"] != "ok" or reference["status"] != "ok":
        return None
    if row["device"] != reference["device"]:
        return None
    return reference["median_ms"] / row["median_ms"]


def check_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """Every target for every fine-tune in ``rows`` (one stack's rows)."""
    out: list[Target] = []
    row, label = DEFAULT_PLAN, "default plan"
    for finetune in dict.fromkeys(r["finetune"] for r in rows):
        cells: Cells = {(r["row"], r["shape"]): r for r in rows if r["finetune"] == finetune}
        out += [_fits(finetune, cells, row, label),
                *(_speed(finetune, cells, row, label, s, goal) for s, goal in SPEED_GOALS),
                _long(finetune, cells, row, label), _busy(finetune, cells, row, label),
                _memory(finetune, cells, row, label)]
    return out


def _fits(finetune: str, cells: Cells, plan: str, label: str) -> Target:
    goal = f"{finetune}: the {label} fits at every shape"
    present = {s: cells[(plan, s)] for s in SHAPES if (plan, s) in cells}
    if not present:
        return Target(goal, f"{label} not measured", None)
    failed = {s: r for s, r in present.items() if r["status"] != "ok"}
    if failed:
        return Target(goal, "; ".join(f"{shape_label(s)}: {outcome(r)}" for s, r in failed.items()), False)
    missing = [shape_label(s) for s in SHAPES if s not in present]
    if missing:
        return Target(goal, f"ran at {', '.join(shape_label(s) for s in present)}; {', '.join(missing)} not measured",
                      None)
    return Target(goal, f"ran at every shape, peak up to {max(r['peak_gib'] for r in present.values()):.1f} GiB", True)


def _speed(finetune: str, cells: Cells, plan: str, label: str, shape: str, goal_x: float) -> Target:
    goal = f"{finetune}: {label} >= {goal_x:g}x the reference at {shape_label(shape)}"
    ours, ref = cells.get((plan, shape)), cells.get((REFERENCE, shape))
    if ours is None or ref is None:
        return Target(goal, f"{label if ours is None else 'reference'} not measured", None)
    if ours["status"] != "ok":
        return Target(goal, f"{label} {outcome(ours)}", False)
    if ref["status"] == "oom":
        return Target(goal, f"reference out of memory; {label} {outcome(ours)}", True)
    if ref["status"] != "ok":
        return Target(goal, f"reference {outcome(ref)}", None)
    ratio = speedup(ours, ref)
    if ratio is None:
        return Target(goal, f"different GPUs: {ours['device']} vs reference {ref['device']}", None)
    return Target(goal, f"{ours['median_ms']:.1f} vs {ref['median_ms']:.1f} ms: {ratio:.2f}x", ratio >= goal_x,
                  ratio - goal_x, "x")


def _long(finetune: str, cells: Cells, plan: str, label: str) -> Target:
    goal = f"{finetune}: {label} runs at {shape_label(LONG_SHAPE)} where the reference does not"
    ours, ref = cells.get((plan, LONG_SHAPE)), cells.get((REFERENCE, LONG_SHAPE))
    if ours is None:
        return Target(goal, f"{label} not measured", None)
    if ours["status"] != "ok":
        return Target(goal, f"{label} {outcome(ours)}", False)
    if ref is None:
        return Target(goal, f"{label} {outcome(ours)}; reference not measured", None)
    if ref["status"] == "oom":
        return Target(goal, f"{label} {outcome(ours)}; reference out of memory", True)
    if ref["status"] != "ok":
        return Target(goal, f"{label} {outcome(ours)}; reference {outcome(ref)}", None)
    return Target(goal, f"both run (the reference fits too): {label} {outcome(ours)}, reference {outcome(ref)}",
                  True)


def _busy(finetune: str, cells: Cells, plan: str, label: str) -> Target:
    goal = f"{finetune}: GPU busy >= {BUSY_GOAL:.0%} ({label}, every shape it ran)"
    busy = {s: r["gpu_busy"] for s in SHAPES if (r := cells.get((plan, s))) and r["status"] == "ok"
            and r.get("gpu_busy") is not None}
    if not busy:
        return Target(goal, f"{label} not profiled", None)
    worst = min(busy, key=lambda s: busy[s])
    listed = ", ".join(f"{shape_label(s)} {b:.0%}" for s, b in busy.items())
    return Target(goal, f"lowest {busy[worst]:.0%} at {shape_label(worst)} ({listed})", busy[worst] >= BUSY_GOAL,
                  busy[worst] - BUSY_GOAL, "points")


def _memory(finetune: str, cells: Cells, plan: str, label: str) -> Target:
    goal = f"{finetune}: peak memory of the {label} <= the reference's (shapes where both ran)"
    pairs = {s: (cells[(plan, s)], cells[(REFERENCE, s)]) for s in SHAPES
             if speedup(cells.get((plan, s)), cells.get((REFERENCE, s))) is not None}
    if not pairs:
        return Target(goal, "no shape where both ran on the same GPU", None)
    worst = max(pairs, key=lambda s: pairs[s][0]["peak_gib"] - pairs[s][1]["peak_gib"])
    ours, ref = pairs[worst]
    excess = ours["peak_gib"] - ref["peak_gib"]
    return Target(goal, f"worst at {shape_label(worst)}: {ours['peak_gib']:.1f} vs reference {ref['peak_gib']:.1f} GiB",
                  excess <= 0, -excess, "GiB")
