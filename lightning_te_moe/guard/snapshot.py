"""A known-good copy of the training state in host memory (or the newest checkpoint), and putting it back.

Parameters and buffers are copied back *in place*, so the optimizers and any wrapper (DDP) keep pointing
at the same tensors. TE's ``_extra_state`` (DelayedScaling amax history) is not part of it: TE refuses to
unpickle it without ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``, and the ladder leaves delayed scaling on
the first step-down anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch


def _to_host(obj: Any) -> Any:
    """A deep copy with every tensor moved (and copied) to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


def _clone(obj: Any) -> Any:
    """A copy to load from, so loading never aliases the snapshot (CPU ``.to`` returns the same tensor)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """Model parameters and buffers, optimizer and LR-scheduler states at the end of optimizer step ``step``."""

    step: int
    tensors: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        for state in self.optimizers:
            for param_state in state["state"].values():
                total += sum(v.numel() * v.element_size() for v in param_state.values() if isinstance(v, torch.Tensor))
        return total


def take_snapshot(step: int, module: torch.nn.Module, optimizers: list[Any], schedulers: list[Any]) -> Snapshot:
    tensors = {f"p:{n}": _to_host(p) for n, p in module.named_parameters()}
    tensors.update({f"b:{n}": _to_host(b) for n, b in module.named_buffers()})
    return Snapshot(step, tensors, [_to_host(o.state_dict()) for o in optimizers],
                    [_to_host(s.state_dict()) for s in schedulers])


@torch.no_grad()
def restore_snapshot(snapshot: Snapshot, module: torch.nn.Module, optimizers: list[Any], schedulers: list[Any]) -> None:
    """Put the snapshot back: parameters/buffers in place, optimizer and scheduler states loaded from copies."""
    for name, param in module.named_parameters():
        param.copy_(snapshot.tensors[f"p:{name}"])
    for name, buf in module.named_buffers():
        buf.copy_(snapshot.tensors[f"b:{name}"])
    for optimizer, state in zip(optimizers, snapshot.optimizers):
        optimizer.load_state_dict(_clone(state))
    for scheduler, state in zip(schedulers, snapshot.schedulers):
        scheduler.load_state_dict(_clone(state))


def last_checkpoint(trainer: Any) -> Optional[str]:
    """The ``last.ckpt`` of the first ``ModelCheckpoint(save_last=True)``, once one was written."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "save_last", None) and callback.last_model_path:
            return callback.last_model_path
    return None


def restore_checkpoint(path: str, trainer: Any) -> int:
    """Load model, optimizer and LR-scheduler states from ``path`` through the strategy (any strategy's
    checkpoint layout); the precision plugin's state is left alone, so the current rung stays. Returns
    the checkpoint's step."""
    checkpoint = trainer.strategy.load_checkpoint(path)
    trainer.strategy.load_model_state_dict(checkpoint, strict=True)
    trainer.strategy.load_optimizer_state_dict(checkpoint)
    for config, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
        config.scheduler.load_state_dict(state)
    return int(checkpoint["global_step"])
