"""Environment -> rules -> plan: what the machine is, what is known about it, and the recipes chosen for it.

``probe_environment`` reads the machine, ``make_plan`` folds the rules table (:mod:`.rules`) and the measured
expert-layer speeds (:mod:`.measurements`) into a :class:`~.plan.Plan`, ``PrecisionState`` is its active rung at run
time, and ``autotune`` times the allowed experts recipes. :mod:`.te_features` says which TE each API needs.
"""

from .choose import STEP_DOWN, PlanError, PrecisionRequest, make_plan
from .environment import (
    Environment,
    TECheck,
    parse_version,
    probe_environment,
    te_installed_version,
)
from .plan import Plan, Reason, Rung
from .recipes import RECIPE_NAMES, RecipeName, RecipeSpec, spec_from_te_recipe
from .rules import RULES, Effect, Rule, When, matching_rules
from .state import PrecisionState

__all__ = [
    "RECIPE_NAMES", "RULES", "STEP_DOWN", "Effect", "Environment", "Plan", "PlanError", "PrecisionRequest",
    "PrecisionState", "Reason", "RecipeName", "RecipeSpec", "Rule", "Rung", "TECheck", "When", "make_plan",
    "matching_rules", "parse_version", "probe_environment", "spec_from_te_recipe", "te_installed_version",
]
