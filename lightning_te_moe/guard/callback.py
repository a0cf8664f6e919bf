"""``DivergenceGuard``: watches loss and gradient norm, and steps down the plan's ladder, rolls back or stops.

The plugin attaches it; a user never has to. How it stays off the host-device critical path:

* Per optimizer step it stacks ``[loss, grad norm]`` on the device (grad norm with ``get_total_norm``
  over the optimizer's gradients, before clipping), averages it across ranks with one two-float
  all-reduce under DDP (enqueued on the device, not waited for), and starts a non-blocking copy to
  pinned host memory followed by a CUDA event.
* It reads step ``t``'s values at the end of step ``t + 1`` (``LAG_STEPS`` on CUDA, 0 on CPU): the
  GPU still has step ``t + 1`` queued while the host waits for step ``t``, so the wait never idles it.
* Every rank reads the same reduced values at the same step, so every rank takes the same decision at
  the same step, without a broadcast.
* Every ``snapshot_every`` steps (and before a step-interval checkpoint, a validation, the end of an
  epoch) it drains what is pending, which is a sync, and copies the state to host memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from ..policy.plan import Rung
from ..policy.state import PrecisionState
from .config import GuardConfig
from .decisions import DecisionLog
from .detector import DivergenceDetector, Trigger
from .metrics import log_level
from .snapshot import (
    Snapshot,
    last_checkpoint,
    restore_checkpoint,
    restore_snapshot,
    take_snapshot,
)

#: Steps between a CUDA step and the read of its values (0 on CPU, where the values are already on host).
LAG_STEPS = 1


class DivergenceError(RuntimeError):
    """Raised (with ``GuardConfig(on_stop="raise")``) when the guard has nothing left to fall back to."""


@dataclass
class _Pending:
    """One optimizer step's ``[loss, grad_norm]``, on its way to the host."""

    step: int
    epoch: int
    values: torch.Tensor
    event: Optional[Any]
    has_loss: bool
    has_grad_norm: bool

    def read(self) -> tuple[Optional[float], Optional[float]]:
        if self.event is not None:
            self.event.synchronize()
        loss, grad_norm = self.values.tolist()
        return (loss if self.has_loss else None), (grad_norm if self.has_grad_norm else None)


class DivergenceGuard(Callback):
    """Detects divergence and responds along ``state.plan.ladder``; every response is a recorded decision.

    Args:
        state: the active rung (shared with the plugin and swapped modules).
        decisions: the run's decision log.
        config: thresholds and limits.
        grads_may_overflow: True while an FP16 loss scaler is active (it skips inf-gradient steps
            itself, so only a non-finite *loss* counts then).
    """

    def __init__(self, state: PrecisionState, decisions: DecisionLog, config: Optional[GuardConfig] = None,
                 grads_may_overflow: Callable[[], bool] = lambda: False) -> None:
        self.state = state
        self.decisions = decisions
        self.config = config or GuardConfig()
        self.grads_may_overflow = grads_may_overflow
        self.detector = DivergenceDetector(self.config)
        self.rollbacks = 0
        self.last_step_down: Optional[int] = None
        self.healthy_steps = 0
        self.promote_floor = 0
        self.entered_by_promotion = False
        self.snapshot: Optional[Snapshot] = None
        self._pending: deque[_Pending] = deque()
        self._lag = 0
        self._seen_step = 0
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_count = 0
        self._grad_sq: Optional[torch.Tensor] = None

    # -- collecting, on device --------------------------------------------------------------------
    @property
    def _in_memory(self) -> bool:
        return self.config.restore_from == "memory"

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._lag = LAG_STEPS if pl_module.device.type == "cuda" else 0
        self._pending.clear()
        self._reset_accumulators()
        self._seen_step = trainer.global_step
        if self._in_memory:
            self._snapshot(trainer, pl_module)
        elif not any(getattr(cb, "save_last", None) for cb in trainer.checkpoint_callbacks):
            raise ValueError("GuardConfig(restore_from='checkpoint') rolls back to last.ckpt: add"
                             " ModelCheckpoint(save_last=True) to the Trainer, or use restore_from='memory'")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            sq = torch.nn.utils.get_total_norm(grads, 2.0).float().square()
            self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq.to(self._grad_sq.device)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        if trainer.global_step == self._seen_step:  # accumulating gradients: no optimizer step yet
            return
        self._seen_step = step = trainer.global_step
        self._push(trainer, pl_module, step)
        snapshot_due = self._in_memory and step - self._snapshot_step() >= self.config.snapshot_every
        self._process(trainer, pl_module, step, drain=snapshot_due or self._checkpoint_due(trainer, step))
        if snapshot_due and not self._pending and not self.detector.in_streak:
            self._snapshot(trainer, pl_module)
        self._maybe_promote(trainer, step)
        if step % trainer.log_every_n_steps == 0 and trainer.global_rank == 0:
            for logger in trainer.loggers:
                log_level(logger, self.state, self.decisions, step)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: its checkpoint must be clean
            self._process(trainer, pl_module, trainer.global_step, drain=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._process(trainer, pl_module, trainer.global_step, drain=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._process(trainer, pl_module, trainer.global_step, drain=True)

    def _reset_accumulators(self) -> None:
        self._loss_sum, self._loss_count, self._grad_sq = None, 0, None

    def _push(self, trainer: Any, pl_module: Any, step: int) -> None:
        device = pl_module.device
        loss = self._loss_sum / self._loss_count if self._loss_sum is not None else None
        grad_norm = self._grad_sq.sqrt() if self._grad_sq is not None else None
        has_loss, has_grad = loss is not None, grad_norm is not None and not self.grads_may_overflow()
        present = [t for t in (loss, grad_norm) if t is not None]
        filler = present[0] if present else torch.zeros((), device=device)  # fills a slot that is ignored
        values = torch.stack([(loss if loss is not None else filler).to(device),
                              (grad_norm if grad_norm is not None else filler).to(device)])
        self._reset_accumulators()
        if trainer.world_size > 1:  # not strategy.reduce: Lightning's adds a barrier, which blocks the host
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
            values = values / trainer.world_size
        event = None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append(_Pending(step, trainer.current_epoch, values, event, has_loss, has_grad))

    def _checkpoint_due(self, trainer: Any, step: int) -> bool:
        """A step-interval ModelCheckpoint saves at this step: check everything before it does."""
        if not self._lag:
            return False
        return any(getattr(cb, "_every_n_train_steps", 0) and step % cb._every_n_train_steps == 0
                   for cb in trainer.checkpoint_callbacks)

    def _snapshot_step(self) -> int:
        return self.snapshot.step if self.snapshot is not None else 0

    # -- deciding, on host --------------------------------------------------------------------------
    def _process(self, trainer: Any, pl_module: Any, now: int, drain: bool) -> None:
        while self._pending and (drain or self._pending[0].step <= now - self._lag):
            pending = self._pending.popleft()
            loss, grad_norm = pending.read()
            trigger = self.detector.update(pending.step, loss, grad_norm)
            if trigger is None:
                self.healthy_steps += 1
                continue
            self._pending.clear()  # later steps ran on the diverging weights
            self.healthy_steps = 0
            self._respond(trainer, pl_module, trigger, now)
            return

    def _respond(self, trainer: Any, pl_module: Any, trigger: Trigger, now: int) -> None:
        cfg = self.config
        epoch = trainer.current_epoch
        rung = self.state.rung
        evidence = {**trigger.evidence(), "detected_at_step": now, "rung_index": self.state.index,
                    "loss_window": len(self.detector.series["loss"].window)}
        wants_rollback = cfg.rollback == "always" or (cfg.rollback == "nonfinite" and trigger.nonfinite)
        in_cooldown = (self.last_step_down is not None and now - self.last_step_down < cfg.cooldown
                       and not (trigger.nonfinite and not wants_rollback))
        at_bottom = not self.state.can_step_down and not in_cooldown
        if wants_rollback and (self.rollbacks >= cfg.max_rollbacks or at_bottom):
            why = (f"{rung.label()} is the last rung of the ladder and diverged" if at_bottom
                   else f"max_rollbacks={cfg.max_rollbacks} reached")
            restored = self._rollback(trainer, pl_module, now, epoch, trigger, evidence, counted=False)
            after = f"weights restored to step {restored}" if restored is not None else "no checkpoint to restore yet"
            self._stop(trainer, f"{why}: {trigger.describe()}; {after}", now, epoch, evidence)
            return
        if wants_rollback:
            if self._rollback(trainer, pl_module, now, epoch, trigger, evidence, counted=True) is None:
                self._stop(trainer, f"{trigger.describe()}; rollback needed but no checkpoint was written yet"
                           " (restore_from='checkpoint')", now, epoch, evidence)
                return
        else:
            self.detector.reset_window()
        if in_cooldown:
            self.decisions.record("hold", f"{trigger.describe()}; staying on {rung.label()}: within the cooldown of"
                                  f" {cfg.cooldown} steps after the step-down at step {self.last_step_down}",
                                  step=now, epoch=epoch, rule=trigger.rule, from_=rung.label(), to=rung.label(),
                                  evidence=evidence)
        elif self.state.can_step_down:
            self._step_down(now, epoch, trigger, evidence)
        else:
            self._stop(trainer, f"{rung.label()} is the last rung of the ladder and diverged: {trigger.describe()}",
                       now, epoch, evidence)

    def _rollback(self, trainer: Any, pl_module: Any, now: int, epoch: int, trigger: Trigger,
                  evidence: dict[str, Any], counted: bool) -> Optional[int]:
        """Restore the known-good state and record it; returns its step (None: nothing to restore)."""
        if self._in_memory:
            assert self.snapshot is not None  # taken at on_train_start
            restore_snapshot(self.snapshot, pl_module, trainer.optimizers,
                             [config.scheduler for config in trainer.lr_scheduler_configs])
            restored, source = self.snapshot.step, "the host-memory snapshot"
        else:
            path = last_checkpoint(trainer)
            if path is None:
                return None
            restored, source = restore_checkpoint(path, trainer), path
        self.detector.rollback_to(restored)
        if counted:
            self.rollbacks += 1
        skipped = now - restored
        self.decisions.record(
            "rollback", f"{trigger.describe()}; restored model, optimizer and LR scheduler from step {restored}"
            f" ({source}); the {skipped} batch(es) since, including the offending one, are skipped",
            step=now, epoch=epoch, rule=trigger.rule, from_=f"step {now}", to=f"step {restored}",
            evidence={**evidence, "snapshot_step": restored, "restored_from": source, "skipped_batches": skipped,
                      "rollbacks": self.rollbacks, "max_rollbacks": self.config.max_rollbacks})
        return restored

    def _step_down(self, now: int, epoch: int, trigger: Trigger, evidence: dict[str, Any]) -> None:
        old = self.state.rung
        if self.entered_by_promotion:
            self.promote_floor = max(self.promote_floor, self.state.index + 1)
        self.state.step_down()
        self.entered_by_promotion = False
        self.last_step_down = now
        self.decisions.record("step_down", f"{trigger.describe()}; next step runs {self.state.rung.label()}",
                              step=now, epoch=epoch, rule=trigger.rule, from_=old.label(), to=self.state.rung.label(),
                              evidence=evidence)

    def _stop(self, trainer: Any, reason: str, now: int, epoch: int, evidence: dict[str, Any]) -> None:
        self.decisions.record("stop", reason, step=now, epoch=epoch, rule="guard", from_=self.state.rung.label(),
                              to="stopped", evidence=evidence)
        trainer.should_stop = True
        if self.config.on_stop == "raise":
            raise DivergenceError(f"lightning-te-moe stopped training at step {now}: {reason}")

    def _maybe_promote(self, trainer: Any, now: int) -> None:
        after = self.config.promote_after
        if after is None or self.healthy_steps < after or self.state.index <= self.promote_floor:
            return
        target: Rung = self.state.plan.ladder[self.state.index - 1]
        if "fp8_delayed" in (target.dense.name, target.experts.name):
            self.promote_floor = self.state.index  # TE would not rebuild its amax history: never go back
            return
        old = self.state.rung
        self.state.set_index(self.state.index - 1)
        self.entered_by_promotion = True
        self.healthy_steps = 0
        self.decisions.record("promote", f"{after} healthy steps on {old.label()}; next step runs {target.label()}",
                              step=now, epoch=trainer.current_epoch, rule="promote_after", from_=old.label(),
                              to=target.label(), evidence={"healthy_steps": after})

    # -- snapshots ----------------------------------------------------------------------------------
    def _snapshot(self, trainer: Any, pl_module: Any) -> None:
        self.snapshot = take_snapshot(trainer.global_step, pl_module, trainer.optimizers,
                                      [config.scheduler for config in trainer.lr_scheduler_configs])

    # -- checkpoints: carried by the plugin's state_dict, which Lightning restores after setup (a callback's
    # own state_dict may be restored before the plugin has attached the guard, so it stays empty) -------
    def guard_state(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "rollbacks": self.rollbacks,
                "last_step_down": self.last_step_down, "healthy_steps": self.healthy_steps,
                "promote_floor": self.promote_floor, "entered_by_promotion": self.entered_by_promotion}

    def load_guard_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        self.rollbacks = int(state["rollbacks"])
        self.last_step_down = state["last_step_down"]
        self.healthy_steps = int(state["healthy_steps"])
        self.promote_floor = int(state["promote_floor"])
        self.entered_by_promotion = bool(state["entered_by_promotion"])
