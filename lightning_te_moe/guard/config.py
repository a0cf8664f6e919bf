"""Settings of the divergence guard: one typed dataclass so LightningCLI/jsonargparse validates them from YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..validation import check_dataclass_fields


@dataclass(frozen=True)
class GuardConfig:
    """When the guard calls a run divergent, and what it does then.

    A value is *anomalous* when it is above ``median + sigma * spread`` of the last ``window`` healthy
    values, where ``spread`` is the robust standard deviation (1.4826 x MAD) but at least
    ``min_rel_spread`` x median (so a flat curve does not make every wiggle an outlier). A spike
    triggers after ``patience`` consecutive anomalous steps; a non-finite loss or gradient norm triggers
    at once. Spike rules start after ``warmup`` observed steps.

    Args:
        window: healthy steps kept for the rolling median/MAD.
        warmup: optimizer steps observed before spike rules apply (non-finite values always trigger).
        patience: consecutive anomalous steps needed for a spike to trigger (a single spike never does
            when ``patience`` > 1).
        loss_sigma: spread multiple above the median for the loss.
        grad_norm_sigma: the same for the gradient norm (heavier-tailed than the loss in healthy runs).
        min_rel_spread: floor of the spread as a fraction of the median.
        watch_grad_norm: also watch the (unclipped) gradient norm, not only the loss.
        rollback: restore the last verified state before responding to a divergence whose updates were
            applied: ``"always"`` (default), ``"nonfinite"`` only for NaN/Inf (a spike then steps down from
            where it is), ``"never"``. A non-finite update that was skipped needs no rollback, and a stop
            always restores the last verified state.
        restore_from: where a rollback takes the verified state from: ``"memory"`` (default), a host
            snapshot of what changes (trainable parameters, their optimizer state, buffers, RNG, scaler,
            TE delayed-scaling history); ``"checkpoint"``, the newest checkpoint of a
            ``ModelCheckpoint(save_last=True)`` (no host copy).
        host_memory_budget: the share of the host memory available when training starts that the guard's two host
            copies, of every rank on the host, may take (estimated before the first copy; Linux ``MemAvailable``).
            Above it rollbacks restore the newest checkpoint where a ``ModelCheckpoint(save_last=True)`` is
            configured, else the guard keeps no host copy and responds without rollbacks; a ``snapshot`` decision
            says which and why (a host killed for memory in a checkpoint's save loses the run). The default leaves
            room for a save, which stages one more copy of each rank's state on the host beside the two: GPT-OSS-20B
            on 4 x H200 held 256 GiB of copies, and 229 GiB were still available beside them after the fit (2026-11-28).
        snapshot_every: steps between host snapshots; None (default) chooses the interval from the
            measured snapshot and step times so that snapshots cost at most ``snapshot_budget``.
        snapshot_budget: the share of step time snapshots may cost when ``snapshot_every`` is None.
        repeat_window: a non-finite step is an isolated bad batch (skipped, the run goes on) unless another
            incident happened within this many steps before it; a repeat is divergence (step down, or stop
            on the last rung).
        max_rollbacks: rollbacks allowed in a run; the next divergence after that stops the run.
        cooldown: steps after a step-down during which a spike does not cause another step-down
            (a non-finite value still rolls back).
        promote_after: healthy steps on a lower rung after which the guard moves one rung back up
            (None: never). A rung that diverged after a promotion is not promoted into again, and rungs
            with delayed scaling are never promotion targets (TE loses their amax history).
        on_stop: ``"stop"`` ends training cleanly (``trainer.should_stop``) after recording the reason;
            ``"raise"`` raises :class:`~lightning_te_moe.guard.DivergenceError`.
    """

    window: int = 100
    warmup: int = 50
    patience: int = 4
    loss_sigma: float = 6.0
    grad_norm_sigma: float = 10.0
    min_rel_spread: float = 0.05
    watch_grad_norm: bool = True
    rollback: Literal["nonfinite", "always", "never"] = "always"
    restore_from: Literal["memory", "checkpoint"] = "memory"
    host_memory_budget: float = 0.6
    snapshot_every: Optional[int] = None
    snapshot_budget: float = 0.02
    repeat_window: int = 100
    max_rollbacks: int = 5
    cooldown: int = 100
    promote_after: Optional[int] = None
    on_stop: Literal["stop", "raise"] = "stop"

    def __post_init__(self) -> None:
        check_dataclass_fields(self)
        for name in ("window", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"GuardConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "max_rollbacks", "cooldown", "repeat_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"GuardConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("promote_after", "snapshot_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"GuardConfig.{name} must be >= 1 or None, got {getattr(self, name)}")
        if not 0 < self.host_memory_budget <= 1:
            raise ValueError("GuardConfig.host_memory_budget is a share of the host's available memory in (0, 1],"
                             f" got {self.host_memory_budget}")
        if not 0 < self.snapshot_budget < 1:
            raise ValueError("GuardConfig.snapshot_budget is a share of step time in (0, 1),"
                             f" got {self.snapshot_budget}")
        if min(self.loss_sigma, self.grad_norm_sigma) <= 0 or self.min_rel_spread < 0:
            raise ValueError("GuardConfig sigmas must be > 0 and min_rel_spread >= 0")
