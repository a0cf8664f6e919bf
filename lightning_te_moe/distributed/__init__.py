"""Lightning's strategies with the plugin: which it serves (:mod:`.strategies`), FSDP/FSDP2 units and casts
(:mod:`.sharding`), and the export of a trained (sharded) model to the original Hugging Face layout (:mod:`.export`)."""

from .sharding import fsdp_wrap_policy, is_sharded, prepare_model, shard_model, shard_units
from .strategies import REFUSED, SUPPORTED, StrategySupport, strategy_support

__all__ = ["REFUSED", "SUPPORTED", "StrategySupport", "fsdp_wrap_policy", "is_sharded", "prepare_model",
           "shard_model", "shard_units", "strategy_support"]
