"""``DivergenceGuard``: watches loss and gradient norm; skips a bad batch, rolls back, steps down the plan's
ladder, or stops.

The plugin attaches it; a user never has to. Per optimizer step, in ``on_before_optimizer_step`` (after
backward, before the update), it stays off the host-device critical path:

* It stacks ``[loss, grad norm]`` on the device: the loss the model computed (Lightning divides it by
  ``accumulate_grad_batches`` before backward; the guard multiplies that back) averaged over the step's
  micro-batches, and the L2 norm of the optimizer's gradients (this rank's shards) before clipping. Under
  DDP/FSDP one all-reduce (enqueued, not waited for) averages it, so every rank sees the same numbers and
  takes the same decisions at the same steps, without a broadcast.
* A non-finite value skips the update. An optimizer that honours ``found_inf`` (torch's fused Adam, AdamW,
  SGD, Adagrad: how ``GradScaler`` skips steps) gets the flag on the device, with no host sync; where the
  values are on the host anyway (CPU) the gradients are dropped; on CUDA with another optimizer the update
  happens and the lagged read below rolls it back.
* The values go to pinned host memory with ``non_blocking`` and an event. Step ``t``'s are read at the end
  of step ``t + 1`` on CUDA (``LAG_STEPS``; at the end of step ``t`` on CPU), when the GPU still has step
  ``t + 1`` queued, so the wait never idles it.

Snapshots (:mod:`.snapshot`) are taken every ``interval`` steps, chosen by :mod:`.cadence` to cost at most
``snapshot_budget`` of step time; before the first interval is set (a few steps in) only one of the starting
state and one after the first step, whose cost sets it. The values of step ``t`` come from the weights after
step ``t - 1``, so a snapshot of the state after step ``t`` is a *candidate* until step ``t + 1``'s values are
read healthy; then it is the *verified* state that rollbacks and stops restore. Before the first copy the guard
checks that its copies fit the host (:mod:`.host_budget`); where they do not, rollbacks restore the newest
checkpoint, or without one the guard keeps no copy and does not roll back. Before a checkpoint (step-interval
``ModelCheckpoint``, validation, epoch end) and at the end of training the guard reads everything pending (a
sync), and goes back to the verified state if the newest values are already above their threshold.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from ..policy.plan import Rung
from ..policy.state import PrecisionState
from .cadence import SnapshotCadence
from .config import GuardConfig
from .decisions import DecisionLog
from .detector import DivergenceDetector, Trigger
from .host_budget import host_budget
from .metrics import log_level, log_snapshot_cost
from .snapshot import SnapshotStore, last_checkpoint, local_tensor, restore_checkpoint, scaler_tensors

#: Steps between a CUDA step and the read of its values (0 on CPU, where the values are already on host).
LAG_STEPS = 1


class DivergenceError(RuntimeError):
    """Raised (with ``GuardConfig(on_stop="raise")``) when the guard has nothing left to fall back to."""


@dataclass
class _Pending:
    """One optimizer step's ``[loss, grad_norm, update_skipped]``, on its way to the host."""

    step: int
    values: torch.Tensor
    event: Optional[Any]
    has_loss: bool
    has_grad_norm: bool

    def read(self) -> tuple[Optional[float], Optional[float], bool]:
        if self.event is not None:
            self.event.synchronize()
        loss, grad_norm, skipped = self.values.tolist()
        return (loss if self.has_loss else None), (grad_norm if self.has_grad_norm else None), skipped > 0


def _saves_last(trainer: Any) -> bool:
    """A ``ModelCheckpoint(save_last=True)`` is configured: rollbacks can restore its ``last.ckpt``."""
    return any(getattr(cb, "save_last", None) for cb in trainer.checkpoint_callbacks)


def _skips_on_device(optimizer: Any) -> bool:
    """The optimizer reads ``found_inf`` on the device and skips its update when it is 1: torch sets this flag
    on optimizers with a fused implementation (``fused=True``), and ``GradScaler`` relies on it the same way."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class DivergenceGuard(Callback):
    """Detects divergence and responds along ``state.plan.ladder``; every response is a recorded decision.

    Args:
        state: the active rung (shared with the plugin and swapped modules).
        decisions: the run's decision log.
        config: thresholds and limits.
        grads_may_overflow: True while an FP16 loss scaler is active (it skips inf-gradient steps
            itself, so only a non-finite *loss* counts then).
        scaler: the FP16 loss scaler, if the plan has one: its scale un-scales the watched loss, and its
            state is part of every snapshot.
    """

    def __init__(self, state: PrecisionState, decisions: DecisionLog, config: Optional[GuardConfig] = None,
                 grads_may_overflow: Callable[[], bool] = lambda: False, scaler: Optional[Any] = None) -> None:
        self.state = state
        self.decisions = decisions
        self.config = config or GuardConfig()
        self.grads_may_overflow = grads_may_overflow
        self.scaler = scaler
        self.detector = DivergenceDetector(self.config)
        self.rollbacks = 0
        self.skips = 0
        self.last_incident: Optional[int] = None
        self.last_step_down: Optional[int] = None
        self.healthy_steps = 0
        self.promote_floor = 0
        self.entered_by_promotion = False
        self.snapshots = SnapshotStore()
        self.restore_from: str = self.config.restore_from  # "none" when no host copy fits and no checkpoint is there
        self.cadence = SnapshotCadence(self.config.snapshot_every, self.config.snapshot_budget)
        self._recorded_interval: Optional[int] = None
        self._pending: deque[_Pending] = deque()
        self._lag = 0
        self._seen_step = 0
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_count = 0
        self._flagged: list[Any] = []
        self._clock: Optional[float] = None
        self._own_ms = 0.0

    @property
    def _in_memory(self) -> bool:
        return self.restore_from == "memory"

    @property
    def _rollback_mode(self) -> str:
        """``config.rollback``, or ``"never"`` while there is nothing to roll back to (no host copy, no checkpoint)."""
        return "never" if self.restore_from == "none" else self.config.rollback

    @staticmethod
    def _reads_late(device: torch.device) -> bool:
        """Whether the step's values live on the device and are read ``LAG_STEPS`` later (else: on the host)."""
        return device.type == "cuda"

    # -- collecting, on device --------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._lag = LAG_STEPS if self._reads_late(pl_module.device) else 0
        self._pending.clear()
        self._loss_sum, self._loss_count = None, 0
        self._seen_step = trainer.global_step
        self.cadence.start(trainer.global_step)
        self.restore_from = self.config.restore_from
        if self._in_memory:
            self._check_host_budget(trainer, pl_module)
        if self._in_memory:
            self._capture(trainer, pl_module, trainer.global_step, verified=True)
        elif self.restore_from == "checkpoint" and not _saves_last(trainer):
            raise ValueError("GuardConfig(restore_from='checkpoint') rolls back to last.ckpt: add"
                             " ModelCheckpoint(save_last=True) to the Trainer, or use restore_from='memory'")
        self._clock = None  # the first step (allocations, autotuning, compilation) is not timed

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Each micro-batch's loss as the model computed it: Lightning's automatic optimization divided it by
        ``accumulate_grad_batches`` (``ClosureResult.from_training_step_output`` in
        lightning/pytorch/loops/optimization/automatic.py) and an active FP16 scaler multiplied it by its scale;
        both are undone here."""
        normalize = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        value = loss.detach().float() * normalize
        # The scale as the scaler's device tensor: ``get_scale()`` would read it on the host, a sync per micro-batch.
        scale = scaler_tensors(self.scaler).get("scale") if self.grads_may_overflow() else None
        if scale is not None:
            value = value / scale.to(value.device, torch.float32)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.snapshots.wait_before_update()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, 2.0).float() if grads else None
        loss = self._loss_sum / self._loss_count if self._loss_sum is not None else None
        self._loss_sum, self._loss_count = None, 0
        device = grads[0].device if grads else (loss.device if loss is not None else pl_module.device)
        zero = torch.zeros((), device=device)
        values = torch.stack([(loss if loss is not None else zero).to(device),
                              (grad_norm if grad_norm is not None else zero)])
        if trainer.world_size > 1:  # not strategy.reduce: Lightning's adds a barrier, which blocks the host
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
            values = values / trainer.world_size
        has_loss, has_grad = loss is not None, grad_norm is not None and not self.grads_may_overflow()
        watched = values[0 if has_loss else 1:2 if has_grad else 1]  # a slice: list indexing would copy to the device
        bad = ~torch.isfinite(watched).all()
        if self.grads_may_overflow():  # the scaler skips exactly the steps whose unscaled gradients are not finite
            skipped = ~torch.isfinite(values[1]) if grad_norm is not None else bad
        elif _skips_on_device(optimizer):
            optimizer.found_inf = bad.float()
            self._flagged.append(optimizer)
            skipped = bad
        elif not self._lag:  # the values are on the host: free to look
            if bad.item():
                for p in params:
                    p.grad = None
            skipped = bad
        else:  # the update happens; the lagged read rolls it back
            skipped = torch.zeros((), dtype=torch.bool, device=device)
        packed = torch.cat([values, skipped.float().reshape(1)])
        event = None
        if packed.is_cuda:
            packed = packed.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append(_Pending(trainer.global_step + 1, packed, event, has_loss, has_grad))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for optimizer in self._flagged:
            vars(optimizer).pop("found_inf", None)
        self._flagged.clear()
        if trainer.global_step == self._seen_step:  # accumulating gradients: no optimizer step yet
            return
        steps, self._seen_step = trainer.global_step - self._seen_step, trainer.global_step
        now = trainer.global_step
        self._time_step(steps)
        checkpoint_due = self._checkpoint_due(trainer, now)
        self._process(trainer, pl_module, now, drain=checkpoint_due)
        if checkpoint_due:
            self._secure(trainer, pl_module, now)
        self._maybe_snapshot(trainer, pl_module, now)
        self._maybe_promote(trainer, now)
        if now % trainer.log_every_n_steps == 0 and trainer.global_rank == 0:
            for logger in trainer.loggers:
                log_level(logger, self.state, self.decisions, now)
                if self._in_memory:
                    log_snapshot_cost(logger, self.cadence.stats(), now)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: its checkpoint comes next
            self._secure(trainer, pl_module, trainer.global_step)
            self._clock = None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._secure(trainer, pl_module, trainer.global_step)
        self._clock = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._secure(trainer, pl_module, trainer.global_step)

    def _time_step(self, steps: int) -> None:
        """Wall time per optimizer step since the last one, without the guard's own snapshot time."""
        now = time.perf_counter()
        if self._clock is not None:
            self.cadence.add_step(((now - self._clock) * 1e3 - self._own_ms) / steps)
        self._clock, self._own_ms = now, 0.0

    def _checkpoint_due(self, trainer: Any, step: int) -> bool:
        """A step-interval ModelCheckpoint saves at this step: verify everything before it does."""
        return any(getattr(cb, "_every_n_train_steps", 0) and step % cb._every_n_train_steps == 0
                   for cb in trainer.checkpoint_callbacks)

    # -- deciding, on host --------------------------------------------------------------------------
    def _process(self, trainer: Any, pl_module: Any, now: int, drain: bool) -> None:
        while self._pending and (drain or self._pending[0].step <= now - self._lag):
            pending = self._pending.popleft()
            loss, grad_norm, skipped = pending.read()
            trigger = self.detector.update(pending.step, loss, grad_norm)
            if trigger is None or (trigger.nonfinite and skipped and not self._is_repeat(trigger)):
                if trigger is None:
                    self.healthy_steps += 1
                else:
                    self._skip(trainer, trigger, now)
                if self.detector.in_streak:  # above threshold, not yet for `patience` steps: the weights are suspect
                    self.snapshots.discard_candidate()
                elif trigger is None:  # step t's values come from the weights after step t - 1: those are verified
                    self.snapshots.verify(pending.step - 1)
                continue
            self._pending.clear()  # later steps ran on the diverging weights, or on the rung being left
            self.snapshots.discard_candidate()
            self.healthy_steps = 0
            self._respond(trainer, pl_module, trigger, now, update_skipped=trigger.nonfinite and skipped)
            return

    def _is_repeat(self, trigger: Trigger) -> bool:
        return self.last_incident is not None and trigger.step - self.last_incident <= self.config.repeat_window

    def _skip(self, trainer: Any, trigger: Trigger, now: int) -> None:
        """An isolated non-finite step whose update was skipped: a bad batch, which costs that batch only."""
        self.skips += 1
        self.last_incident = trigger.step
        self.decisions.record(
            "skip", f"{trigger.describe()}; its update was skipped, so only that batch is lost; an isolated"
            f" non-finite step is a bad batch, not divergence: staying on {self.state.rung.label()} (another"
            f" incident within {self.config.repeat_window} steps is divergence)",
            step=now, epoch=trainer.current_epoch, rule=trigger.rule, from_=f"step {trigger.step}", to="skipped",
            evidence={**trigger.evidence(), "detected_at_step": now, "steps_lost": 1, "skips": self.skips})

    def _respond(self, trainer: Any, pl_module: Any, trigger: Trigger, now: int, update_skipped: bool) -> None:
        cfg = self.config
        epoch = trainer.current_epoch
        rung = self.state.rung
        repeat = self._is_repeat(trigger)
        evidence = {**trigger.evidence(), "detected_at_step": now, "rung_index": self.state.index,
                    "loss_window": len(self.detector.series["loss"].window), "update_skipped": update_skipped,
                    "repeat_of_step": self.last_incident if repeat else None}
        self.last_incident = trigger.step
        mode = self._rollback_mode
        restore = not update_skipped and (mode == "always" or (mode == "nonfinite" and trigger.nonfinite))
        in_cooldown = self.last_step_down is not None and now - self.last_step_down < cfg.cooldown
        if restore and self.rollbacks >= cfg.max_rollbacks:
            self._stop(trainer, pl_module, f"max_rollbacks={cfg.max_rollbacks} reached: {trigger.describe()}", now,
                       evidence)
            return
        if repeat and not self.state.can_step_down:
            self._stop(trainer, pl_module, f"{rung.label()} is the last rung of the ladder and diverged again within"
                       f" repeat_window={cfg.repeat_window} steps of step {evidence['repeat_of_step']}:"
                       f" {trigger.describe()}", now, evidence)
            return
        if restore:
            restored = self._rollback(trainer, pl_module, now, trigger.describe(), trigger.rule, evidence, counted=True)
            if restored is None:
                self._stop(trainer, pl_module, f"{trigger.describe()}; rollback needed but no checkpoint was written"
                           " yet (restore_from='checkpoint')", now, evidence)
                return
        elif not update_skipped:
            self.detector.reset_window()  # no rollback: the level may have moved, learn it again
        if trigger.nonfinite and not repeat:  # an isolated bad batch whose update was applied (read a step late)
            if not restore:
                why = "no host copy and no checkpoint to restore" if self.restore_from == "none" else "rollback='never'"
                self._hold(trigger, now, epoch, evidence, f"{why}: staying on {rung.label()} without restoring the"
                           " weights")
            return  # rolled back: the batch was bad, not the precision
        if not self.state.can_step_down:
            where = "from the restored state" if restore else "without a rollback"
            self._hold(trigger, now, epoch, evidence, f"{rung.label()} is the last rung of the ladder: continuing"
                       f" {where}; another divergence within {cfg.repeat_window} steps stops the run")
        elif in_cooldown:
            self._hold(trigger, now, epoch, evidence, f"staying on {rung.label()}: within the cooldown of"
                       f" {cfg.cooldown} steps after the step-down at step {self.last_step_down}")
        else:
            self._step_down(now, epoch, trigger, evidence)

    def _restore(self, trainer: Any, pl_module: Any) -> Optional[tuple[int, str, dict[str, Any]]]:
        """Put the last verified state back: (its step, where from, details), or None when there is none."""
        if self.restore_from == "none":
            return None
        if self._in_memory:
            details = self.snapshots.restore(pl_module, trainer.optimizers,
                                             [config.scheduler for config in trainer.lr_scheduler_configs], self.scaler)
            return details.pop("step"), "the host snapshot", details
        path = last_checkpoint(trainer)
        if path is None:
            return None
        return restore_checkpoint(path, trainer), path, {}

    def _rollback(self, trainer: Any, pl_module: Any, now: int, why: str, rule: str, evidence: dict[str, Any],
                  counted: bool) -> Optional[int]:
        """Restore the last verified state and record it; returns its step (None: nothing to restore)."""
        restored = self._restore(trainer, pl_module)
        if restored is None:
            return None
        step, source, details = restored
        self._pending.clear()
        self.detector.rollback_to(step)
        if counted:
            self.rollbacks += 1
        if self.snapshots.good is not None:  # it is the state at `now` from here on: a later rollback loses less
            self.snapshots.good.step = now
        self.cadence.mark(now)
        lost = now - step
        what = "model, optimizer" if not self._in_memory else "trainable parameters, buffers, optimizer state, RNG"
        self.decisions.record(
            "rollback", f"{why}; restored {what} from step {step} ({source}); the {lost} batch(es) since, the"
            " offending one included, are skipped: global_step, the LR schedule and the data loader move on",
            step=now, epoch=trainer.current_epoch, rule=rule, from_=f"step {now}", to=f"step {step}",
            evidence={**evidence, "snapshot_step": step, "restored_from": source, "steps_lost": lost,
                      "rollbacks": self.rollbacks, "max_rollbacks": self.config.max_rollbacks, **details})
        return step

    def _secure(self, trainer: Any, pl_module: Any, now: int) -> None:
        """Before a checkpoint or the end: read everything pending. With ``rollback="always"``, weights whose
        loss or gradient norm is already above its threshold (for fewer than ``patience`` steps) do not reach a
        checkpoint: the verified state comes back, as an incident; a second one within ``repeat_window`` is
        divergence (so a persistent blow-up cannot hide behind frequent checkpoints)."""
        self._process(trainer, pl_module, now, drain=True)
        trigger = self.detector.open_streak()
        if trainer.should_stop or trigger is None or self._rollback_mode != "always":
            return
        if self._is_repeat(trigger):
            self._pending.clear()
            self.snapshots.discard_candidate()
            self._respond(trainer, pl_module, trigger, now, update_skipped=False)
            return
        self.last_incident = trigger.step
        self._rollback(trainer, pl_module, now, f"{trigger.describe()} (patience {self.config.patience}) at a"
                       " checkpoint or the end of training: no checkpoint holds weights the guard already suspects",
                       "suspect_at_checkpoint", trigger.evidence(), counted=False)

    def _hold(self, trigger: Trigger, now: int, epoch: int, evidence: dict[str, Any], why: str) -> None:
        rung = self.state.rung.label()
        self.decisions.record("hold", f"{trigger.describe()}; {why}", step=now, epoch=epoch, rule=trigger.rule,
                              from_=rung, to=rung, evidence=evidence)

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

    def _stop(self, trainer: Any, pl_module: Any, reason: str, now: int, evidence: dict[str, Any]) -> None:
        """Stop with the last verified weights in the model (and so in every checkpoint written after)."""
        restored = self._restore(trainer, pl_module)
        if restored is None:
            after = "no host copy to restore" if self.restore_from == "none" else "no checkpoint to restore yet"
        else:
            step, source, details = restored
            self.detector.rollback_to(step)
            evidence = {**evidence, "snapshot_step": step, "restored_from": source, **details}
            after = f"weights restored to step {step} ({source})"
        self._pending.clear()
        self.decisions.record("stop", f"{reason}; {after}", step=now, epoch=trainer.current_epoch, rule="guard",
                              from_=self.state.rung.label(), to="stopped", evidence=evidence)
        trainer.should_stop = True
        if self.config.on_stop == "raise":
            raise DivergenceError(f"lightning-te-moe stopped training at step {now}: {reason}; {after}")

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
    def _check_host_budget(self, trainer: Any, pl_module: Any) -> None:
        """Fall back from host copies that would not fit this host (:mod:`.host_budget`), before the first one is
        taken: to the newest checkpoint, else to no rollbacks. Every rank decides alike (one small all-reduce)."""
        ranks_on_host = trainer.num_devices if trainer.world_size > 1 else 1
        check = host_budget(pl_module, trainer.optimizers, self.config.host_memory_budget, ranks_on_host)
        over = check is not None and not check.fits
        if trainer.world_size > 1:
            flag = torch.tensor([float(over)], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item())
        if not over:
            return
        why = check.describe() if check is not None and not check.fits else "another rank's host copies would not fit"
        if _saves_last(trainer):
            self.restore_from = "checkpoint"
            what = ("rollbacks restore the newest checkpoint (ModelCheckpoint(save_last=True)) instead; the guard keeps"
                    " no host copy")
        else:
            self.restore_from = "none"
            what = ("there is no ModelCheckpoint(save_last=True) to roll back to either: the guard keeps no host copy"
                    " and responds without rollbacks (a non-finite update is still skipped where the optimizer allows;"
                    " divergence steps down or stops). Add ModelCheckpoint(save_last=True) or raise"
                    " GuardConfig.host_memory_budget to roll back")
        self.snapshots.release()  # copies an earlier fit of this guard may still hold
        self.decisions.record("snapshot", f"{why}: {what}", step=trainer.global_step, epoch=trainer.current_epoch,
                              rule="host_memory_budget", to=self.restore_from,
                              evidence=check.evidence() if check is not None else {})
        rank_zero_warn(f"lightning-te-moe: {why}: {what}")

    def _maybe_snapshot(self, trainer: Any, pl_module: Any, now: int) -> None:
        if not self._in_memory or trainer.should_stop:
            return
        for cost_ms, nbytes in self.snapshots.finished_costs():
            self.cadence.add_snapshot(cost_ms, nbytes)
        if self.cadence.check_due(now):
            self._agree_interval(trainer, pl_module, now)
        if (not self.cadence.due(now) or self.detector.in_streak
                or self.snapshots.candidate is not None):  # one unverified copy at a time
            return
        self._capture(trainer, pl_module, now, verified=False)
        self.cadence.mark(now)

    def _capture(self, trainer: Any, pl_module: Any, step: int, verified: bool) -> None:
        slot = self.snapshots.capture(step, pl_module, trainer.optimizers,
                                      [config.scheduler for config in trainer.lr_scheduler_configs], self.scaler,
                                      verified=verified)
        self._own_ms += slot.host_ms + slot.alloc_ms

    def _agree_interval(self, trainer: Any, pl_module: Any, now: int) -> None:
        """Set the interval from the measurements; every rank takes the largest proposal (one small all-reduce at
        the check steps only; 0 stands for "not measured yet"), so every rank snapshots at the same steps."""
        interval = self.cadence.proposal()
        if trainer.world_size > 1:
            agreed = torch.tensor([float(interval or 0)], device=pl_module.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            interval = int(agreed.item()) or None
        self.cadence.agree(interval)
        if interval is None:
            return
        recorded = self._recorded_interval
        if recorded is not None and recorded < 2 * interval and interval < 2 * recorded:
            return
        self._recorded_interval = interval
        stats = self.cadence.stats()
        share = stats["cost_share"]
        self.decisions.record(
            "snapshot", f"snapshot every {interval} step(s): one costs {stats['snapshot_ms']} ms"
            f" ({stats['snapshot_bytes'] / 2**20:.1f} MiB) against {stats['step_ms']} ms per step, "
            + (f"{share:.2%} of step time" if share is not None else "share not measured yet")
            + (f" (budget {self.config.snapshot_budget:.0%})" if not stats["fixed"] else " (snapshot_every)"),
            step=now, epoch=trainer.current_epoch, rule="snapshot_budget", to=f"every {interval}", evidence=stats)

    # -- checkpoints: carried by the plugin's state_dict, which Lightning restores after setup (a callback's
    # own state_dict may be restored before the plugin has attached the guard, so it stays empty) -------
    def guard_state(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "rollbacks": self.rollbacks, "skips": self.skips,
                "last_incident": self.last_incident, "last_step_down": self.last_step_down,
                "healthy_steps": self.healthy_steps, "promote_floor": self.promote_floor,
                "entered_by_promotion": self.entered_by_promotion}

    def load_guard_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        self.rollbacks = int(state["rollbacks"])
        self.skips = int(state.get("skips", 0))
        self.last_incident = state.get("last_incident")
        self.last_step_down = state["last_step_down"]
        self.healthy_steps = int(state["healthy_steps"])
        self.promote_floor = int(state["promote_floor"])
        self.entered_by_promotion = bool(state["entered_by_promotion"])
