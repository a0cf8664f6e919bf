"""What every decision sink shares: the metric names, the alert kinds, time stamps and the level metric.

Its own module so that the sinks (:mod:`.sinks`) and W&B (:mod:`.wandb_sink`) both import it, not each other.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ..policy.state import PrecisionState
from .decisions import Decision, DecisionLog

#: Decisions that mean the run is in trouble: printed as warnings and alerted in W&B.
ALERT_KINDS = ("step_down", "rollback", "stop")
#: Metric names, the same in every logger.
LEVEL_METRIC = "precision/level"
STEP_DOWNS_METRIC = "precision/step_downs"
ROLLBACKS_METRIC = "precision/rollbacks"
SKIPS_METRIC = "precision/skipped_steps"
#: What the guard's snapshots cost (:meth:`lightning_te_moe.guard.cadence.SnapshotCadence.stats`).
SNAPSHOT_METRICS = {"snapshot_ms": "guard/snapshot_ms", "step_ms": "guard/step_ms",
                    "interval": "guard/snapshot_interval", "cost_share": "guard/snapshot_cost_share",
                    "snapshot_bytes": "guard/snapshot_bytes"}


def iso_time(decision: Decision) -> str:
    return datetime.fromtimestamp(decision.wall_time, tz=timezone.utc).isoformat(timespec="seconds")


def log_level(logger: Any, state: PrecisionState, log: DecisionLog, step: int) -> None:
    """The step-wise metrics: active rung (0 = the plan's start, +1 per step-down) and the counters.

    Lightning logs the loss of the batch that completes optimizer step N at x = N - 1 (its
    ``trainer/global_step`` counts batches before the step); the metrics go to the same x, so a
    step-down sits on the loss point of the batch that triggered it.
    """
    logger.log_metrics({LEVEL_METRIC: float(state.index), STEP_DOWNS_METRIC: float(log.count("step_down")),
                        ROLLBACKS_METRIC: float(log.count("rollback")), SKIPS_METRIC: float(log.count("skip"))},
                       step=max(step - 1, 0))


def log_snapshot_cost(logger: Any, stats: dict[str, Any], step: int) -> None:
    """The snapshot's measured cost, its interval and its share of step time, at the same x as the level."""
    metrics = {name: float(stats[key]) for key, name in SNAPSHOT_METRICS.items() if stats[key] is not None}
    if metrics:
        logger.log_metrics(metrics, step=max(step - 1, 0))
