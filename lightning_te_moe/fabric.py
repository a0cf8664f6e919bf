"""``TEMoEFabricPrecision``: the plugin's plan, module swaps and forward precision under Lightning Fabric.

The Trainer plugin (:class:`~lightning_te_moe.plugin.TEMoEPrecision`) does the work; this class gives it Fabric's
hooks. Fabric has no callbacks, so there is no divergence guard: the run stays on the plan's first rung.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Optional

from lightning.fabric.plugins.precision import MixedPrecision, Precision
from torch import Tensor
from torch.nn import Module

from .plugin import TEMoEPrecision
from .policy import Plan


class TEMoEFabricPrecision(Precision):
    """Fabric's precision plugin: at ``fabric.setup`` it plans on the device (every rank takes rank 0's plan), runs
    the module swaps and casts the parameters, as the Trainer plugin does; every forward runs in the plan's precision;
    ``state_dict`` holds the plan, rung and decisions (put it in the state you ``fabric.save``).

    Strategies: single device, DDP, and Fabric's ``ModelParallelStrategy`` (FSDP2): Fabric converts the module before
    the strategy's ``parallelize_fn`` runs, so the swaps come first; shard there with
    :func:`lightning_te_moe.distributed.sharding.fully_shard_units`. Fabric's ``FSDPStrategy`` takes only its own
    ``FSDPPrecision``.

    Args: those of :class:`~lightning_te_moe.plugin.TEMoEPrecision`, less ``guard`` and ``guard_config``.
    """

    precision: str = "32-true"

    def __init__(self, recipe: Any = "auto", **kwargs: Any) -> None:
        for name in ("guard", "guard_config"):
            if name in kwargs:
                raise TypeError(f"TEMoEFabricPrecision({name}=...): Fabric has no callbacks, so there is no divergence"
                                " guard; the run stays on the plan's first rung (use lightning.Trainer for the guard)")
        self.core = TEMoEPrecision(recipe, guard=False, **kwargs)
        self._scaler: Optional[MixedPrecision] = None

    @property
    def plan(self) -> Optional[Plan]:
        return self.core.plan

    @property
    def decisions(self) -> Any:
        return self.core.decisions

    def convert_module(self, module: Module) -> Module:
        self.core.convert_module(module)
        assert self.core.state is not None
        self.precision = self.core.precision
        if self.core.state.dense.name == "fp16" and self.core._device_type == "cuda":
            self._scaler = MixedPrecision("16-mixed", device="cuda")  # the gradient scaler FP16 needs
        return module

    def forward_context(self) -> AbstractContextManager:
        return self.core.forward_context()

    def pre_backward(self, tensor: Tensor, module: Optional[Module]) -> Any:
        return self._scaler.pre_backward(tensor, module) if self._scaler is not None else tensor

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if self._scaler is not None:
            return self._scaler.optimizer_step(optimizer, **kwargs)
        return optimizer.step(**kwargs)

    def unscale_gradients(self, optimizer: Any) -> None:
        if self._scaler is not None:
            self._scaler.unscale_gradients(optimizer)

    def state_dict(self) -> dict[str, Any]:
        state = self.core.state_dict()
        if self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
        if self._scaler is not None and state_dict.get("scaler"):
            self._scaler.load_state_dict(state_dict["scaler"])
