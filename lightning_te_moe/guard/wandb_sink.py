"""Decisions in W&B, through Lightning's ``WandbLogger``: config, a decisions table, the level metric,
alerts and summary fields. Imported only when the Trainer has a WandbLogger (so wandb is installed).
"""

from __future__ import annotations

import json
from typing import Any

from ..policy.state import PrecisionState
from .decisions import Decision, DecisionLog
from .metrics import ALERT_KINDS, iso_time, log_level

TABLE_KEY = "precision/decisions"
TABLE_COLUMNS = ["step", "epoch", "time", "kind", "from", "to", "rule", "reason", "evidence"]


def table_row(decision: Decision) -> list[Any]:
    return [decision.step, decision.epoch, iso_time(decision), decision.kind, decision.from_, decision.to,
            decision.rule, decision.reason, json.dumps(decision.evidence, default=str, sort_keys=True)]


class WandbSink:
    """Puts the plan and environment in the run config; on each decision re-logs the whole decisions table
    (a table logged once is immutable), logs the level metric, updates the summary, and alerts on trouble.
    """

    def __init__(self, logger: Any, state: PrecisionState, log: DecisionLog) -> None:
        self.logger = logger
        self.state = state
        self.log = log
        self.run = logger.experiment
        plan = state.plan
        self.run.config.update({"precision/plan": plan.to_dict(), "precision/plan_summary": plan.summary(),
                                "precision/environment": plan.environment.to_dict()}, allow_val_change=True)

    def __call__(self, decision: Decision) -> None:
        self._log_table(decision.step)
        log_level(self.logger, self.state, self.log, decision.step)
        self.run.summary["precision/final_recipe"] = self.state.rung.label()
        self.run.summary["precision/step_downs"] = self.log.count("step_down")
        self.run.summary["precision/rollbacks"] = self.log.count("rollback")
        if decision.kind in ALERT_KINDS:
            import wandb

            self.run.alert(title=f"lightning-te-moe: {decision.kind} at step {decision.step}", text=decision.line(),
                           level=wandb.AlertLevel.ERROR if decision.kind == "stop" else wandb.AlertLevel.WARN,
                           wait_duration=0)

    def restore(self, decisions: list[Decision]) -> None:
        """On resume: the table shows the checkpoint's full history again."""
        self._log_table(decisions[-1].step if decisions else 0)

    def _log_table(self, step: int) -> None:
        self.logger.log_table(TABLE_KEY, columns=TABLE_COLUMNS, data=[table_row(d) for d in self.log.decisions],
                              step=step)
