"""Detect divergence, respond along the plan's ladder, and record every decision where people look.

``DivergenceGuard`` (the Lightning callback) feeds ``DivergenceDetector``, skips bad updates and restores
``snapshot``s taken at the interval ``cadence`` measures;
``DecisionLog`` fans each decision out to the sinks (console, JSONL audit file, Lightning loggers, W&B).
"""

from .callback import DivergenceError, DivergenceGuard
from .config import GuardConfig
from .decisions import Decision, DecisionLog
from .detector import DivergenceDetector, Trigger
from .sinks import attach_sinks

__all__ = ["Decision", "DecisionLog", "DivergenceDetector", "DivergenceError", "DivergenceGuard", "GuardConfig",
           "Trigger", "attach_sinks"]
