"""Where decisions go: one console line, the ``precision_decisions.jsonl`` audit file, every Lightning logger.

All sinks live on global rank 0 only (every rank takes the same decisions; one copy is enough).
W&B has its own module (:mod:`lightning_te_moe.guard.wandb_sink`) and is only imported when a WandbLogger exists.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ..policy.state import PrecisionState
from .decisions import Decision, DecisionLog
from .metrics import ALERT_KINDS, iso_time, log_level

JSONL_NAME = "precision_decisions.jsonl"

#: A child of Lightning's logger, so the lines appear wherever Lightning's own messages do.
_console = logging.getLogger("lightning.pytorch.lightning_te_moe")


class ConsoleSink:
    """One readable line per decision; trouble (skip, step-down, rollback, hold, stop) at warning level."""

    def __call__(self, decision: Decision) -> None:
        level = logging.WARNING if decision.kind in (*ALERT_KINDS, "hold", "skip") else logging.INFO
        _console.log(level, decision.line())


class JsonlSink:
    """Appends each decision as one JSON object per line; never rewrites (it is an audit trail)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def __call__(self, decision: Decision) -> None:
        self._append([decision])

    def restore(self, decisions: list[Decision]) -> None:
        """On resume: add the checkpoint's history where this file does not have it yet (a new log dir)."""
        have = set()
        if os.path.exists(self.path):
            with open(self.path) as f:
                have = {_key(json.loads(line)) for line in f if line.strip()}
        self._append([d for d in decisions if _key(d.to_dict()) not in have])

    def _append(self, decisions: list[Decision]) -> None:
        with open(self.path, "a") as f:
            for decision in decisions:
                f.write(json.dumps({**decision.to_dict(), "time": iso_time(decision)}, default=str) + "\n")


def _key(record: dict[str, Any]) -> tuple:
    return record["kind"], record["step"], record["wall_time"]


class LoggerSink:
    """A Lightning logger: the level metric and counters at each decision, plus a text/hparams record.

    TensorBoard gets each decision as text under ``precision/decisions``; CSV keeps the list of decision
    lines in ``hparams.yaml`` (``precision_decisions``); other loggers get the metrics only.
    """

    def __init__(self, logger: Any, state: PrecisionState, log: DecisionLog) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        self.logger = logger
        self.state = state
        self.log = log
        self.is_tb = isinstance(logger, TensorBoardLogger)
        self.is_csv = isinstance(logger, CSVLogger)
        plan = state.plan
        if self.is_tb or self.is_csv:
            logger.log_hyperparams({"precision_plan": plan.summary(), "precision_environment": plan.environment.summary()})
        if self.is_tb:
            logger.experiment.add_text("precision/plan", f"```\n{plan.render_text()}\n```", 0)

    def __call__(self, decision: Decision) -> None:
        log_level(self.logger, self.state, self.log, decision.step)
        if self.is_tb:
            self.logger.experiment.add_text("precision/decisions", f"`{iso_time(decision)}` {decision.line()}",
                                            decision.step)
        if self.is_csv:
            self._csv_record()

    def restore(self, decisions: list[Decision]) -> None:
        if self.is_csv:
            self._csv_record()

    def _csv_record(self) -> None:
        self.logger.log_hyperparams({"precision_decisions": [f"{iso_time(d)} {d.line()}" for d in self.log.decisions]})


def run_log_dir(trainer: Any) -> str:
    """The run's log directory (``trainer.log_dir``, else ``default_root_dir``). Collective under DDP."""
    return trainer.log_dir or trainer.default_root_dir


def attach_sinks(log: DecisionLog, trainer: Any, state: PrecisionState) -> list[Any]:
    """Attach console, JSONL, logger and W&B sinks for ``trainer`` (rank 0); returns the loggers written to."""
    log_dir = run_log_dir(trainer)  # every rank: it broadcasts
    log.clear_sinks()
    if trainer.global_rank != 0:
        return []
    log.add_sink(ConsoleSink())
    log.add_sink(JsonlSink(os.path.join(log_dir, JSONL_NAME)))
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            from .wandb_sink import WandbSink

            log.add_sink(WandbSink(logger, state, log))
        else:
            log.add_sink(LoggerSink(logger, state, log))
    return list(trainer.loggers)
