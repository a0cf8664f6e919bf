"""Real Trainer.fit runs with provoked divergence on CPU: skip, rollback, step-down, hold, promote and stop.

The issue's cases, with the steps each one loses: a transient NaN costs its batch (1 step), also under
gradient accumulation; a persistent blow-up on the last rung stops with verified weights in the model and in
every checkpoint; read a step late as on CUDA, a fused optimizer still skips on the device (1 step) and any
other optimizer rolls back a few steps.
"""

import math
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml
from guard_support import CpuLadderPrecision, LrBoost, StepRecorder, ThreeRungPrecision, TinyRegression, read_jsonl
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_te_moe import DivergenceError, DivergenceGuard, GuardConfig
from lightning_te_moe.guard.sinks import JSONL_NAME


def fit(tmp_path: Path, model: TinyRegression, config: GuardConfig = GuardConfig(), max_steps: int = 200,
        callbacks: list = (), loggers: Optional[list] = None, plugin_cls: type = CpuLadderPrecision,
        recipe: str = "auto",
        **kwargs) -> tuple[Trainer, CpuLadderPrecision]:
    plugin = plugin_cls(recipe, print_plan=False, guard_config=config)
    trainer = Trainer(max_steps=max_steps, plugins=[plugin], accelerator="cpu", devices=1,
                      default_root_dir=tmp_path, logger=loggers if loggers is not None else CSVLogger(tmp_path),
                      callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=10, **kwargs)
    trainer.fit(model)
    return trainer, plugin


def kinds(plugin: CpuLadderPrecision) -> list[str]:
    """Decision kinds, without the module swaps' reports and the snapshot cadence (not divergence responses)."""
    return [d.kind for d in plugin.decisions.decisions if d.kind not in ("swap", "snapshot")]


def guard_decisions(plugin: CpuLadderPrecision) -> list:
    return [d for d in plugin.decisions.decisions if d.kind not in ("plan", "swap", "snapshot")]


def assert_healthy(model: TinyRegression, trainer: Trainer) -> None:
    """Finite parameters; the optimizer still owns the model's tensors and has finite state for each."""
    params = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    opt = trainer.optimizers[0]
    assert [p for g in opt.param_groups for p in g["params"]] == params
    for p in params:
        state = opt.state[p]
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
        assert int(state["step"]) > 0


def data_loss(model: TinyRegression, state_dict: Optional[dict] = None) -> float:
    """The model's loss over its whole training set (with ``state_dict`` loaded into a copy, if given)."""
    import copy

    net = copy.deepcopy(model.net)
    if state_dict is not None:
        net.load_state_dict({k.removeprefix("net."): v for k, v in state_dict.items()})
    x, y = model.train_dataloader().dataset.tensors
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(x), y))


def test_transient_nan_on_the_last_rung_costs_that_batch_only(tmp_path: Path) -> None:
    """The issue's first case: the plan is bf16 (its last rung) and one batch gives a NaN loss."""
    model, recorder = TinyRegression(nan_at=(120,)), StepRecorder()
    trainer, plugin = fit(tmp_path, model, callbacks=[recorder], recipe="bf16")
    assert kinds(plugin) == ["plan", "skip"] and plugin.state.plan.summary() == "bf16"
    skip = guard_decisions(plugin)[0]
    assert (skip.step, skip.rule, skip.evidence["steps_lost"]) == (121, "nonfinite_loss", 1)
    assert trainer.global_step == 200 and not trainer.should_stop
    assert torch.equal(recorder.params[121], recorder.params[120])  # its update was skipped: nothing to roll back
    assert recorder.adam_steps[200] == 199  # every other batch was applied
    assert plugin.guard.skips == 1 and plugin.guard.rollbacks == 0
    assert_healthy(model, trainer)


class OneBadMicroBatch(TinyRegression):
    """A NaN loss in the third of the four micro-batches of optimizer step 41 only."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 40 and batch_idx % 4 == 2:
            self.losses[41][-1] = math.nan
            return loss * float("nan")
        return loss


def test_transient_nan_with_gradient_accumulation_costs_that_batch_and_the_true_loss_is_watched(
        tmp_path: Path) -> None:
    model, recorder = OneBadMicroBatch(), StepRecorder()
    trainer, plugin = fit(tmp_path, model, max_steps=60, callbacks=[recorder], accumulate_grad_batches=4)
    assert kinds(plugin) == ["plan", "skip"]
    skip = guard_decisions(plugin)[0]
    assert skip.step == 41 and skip.evidence["steps_lost"] == 1 and trainer.global_step == 60
    assert torch.equal(recorder.params[41], recorder.params[40]) and recorder.adam_steps[60] == 59
    # the watched loss is the mean of the losses the model computed, not Lightning's loss / 4
    window = dict(plugin.guard.detector.series["loss"].window)
    assert len(window) == 59 and 41 not in window
    for step in (1, 40, 42, 60):
        assert len(model.losses[step]) == 4
        assert window[step] == pytest.approx(sum(model.losses[step]) / 4, rel=1e-5)
    assert_healthy(model, trainer)


def test_persistent_blowup_on_the_last_rung_stops_with_verified_weights_in_the_model_and_every_checkpoint(
        tmp_path: Path) -> None:
    """Learning rate x1e4 from step 101 on, plan bf16, a checkpoint every 3 steps: the first suspect state is
    rolled back before its checkpoint, the second stops the run; nothing diverged is ever saved."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    model, boost = TinyRegression(), LrBoost(at=100, persistent=True)
    trainer, plugin = fit(tmp_path, model, GuardConfig(snapshot_every=1), max_steps=300, callbacks=[ckpt, boost],
                          recipe="bf16")
    decisions = guard_decisions(plugin)
    assert [d.kind for d in decisions] == ["rollback", "stop"]
    rollback, stop = decisions
    # the loss is far above its threshold at the checkpoint of step 102, before `patience` steps: not saved
    assert (rollback.step, rollback.to, rollback.rule, rollback.evidence["steps_lost"]) == (
        102, "step 100", "suspect_at_checkpoint", 2)
    assert "bf16 is the last rung of the ladder and diverged again within repeat_window=100" in stop.reason
    assert trainer.should_stop and trainer.global_step == stop.step == 105
    assert stop.evidence["snapshot_step"] == rollback.step  # the state restored at the rollback, verified since
    assert_healthy(model, trainer)
    assert data_loss(model) < 0.1
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) > 30
    for path in saved:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path.name
        assert data_loss(model, state) < 1.0, path.name  # never a blown-up state (its loss is 1e4 and more)


def test_spike_rolls_back_steps_down_and_the_schedule_follows_global_step(tmp_path: Path) -> None:
    """A one-step x1e4 learning rate at step 151: rolled back from step N to M, then the documented policy: the
    optimizer's own step count is M's plus the steps since, the LR schedule and global_step move on."""
    model, boost, recorder = TinyRegression(), LrBoost(at=150), StepRecorder()
    trainer, plugin = fit(tmp_path, model, GuardConfig(snapshot_every=1), max_steps=300, callbacks=[boost, recorder])
    assert trainer.global_step == 300 and boost.fired_at == 150
    assert kinds(plugin) == ["plan", "rollback", "step_down"]
    rollback, step_down = guard_decisions(plugin)
    n, m = rollback.step, rollback.evidence["snapshot_step"]
    # step 151's update is the bad one; step 152's values (its first evidence) verify nothing after step 150
    assert m == 150 and rollback.to == "step 150" and 152 + 3 <= n <= 160 and rollback.evidence["steps_lost"] == n - m
    assert rollback.step == step_down.step and (step_down.from_, step_down.to, step_down.rule) == ("bf16", "fp32",
                                                                                                   "loss_spike")
    assert recorder.adam_steps[300] == 300 - (n - m)  # the updates of the lost batches are undone
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 300  # the schedule did not go back with the weights
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + 300 / 1000))  # no trace of x1e4
    assert plugin.state.index == 1 and plugin.precision == "32-true"
    assert_healthy(model, trainer)
    assert trainer.callback_metrics["train_loss"] < 0.2
    # the audit file, the CSV metrics and hparams
    log_dir = Path(trainer.log_dir)
    records = [r for r in read_jsonl(log_dir / JSONL_NAME) if r["kind"] not in ("swap", "snapshot")]
    assert [r["kind"] for r in records] == kinds(plugin)
    assert records[-1]["from"] == "bf16" and records[-1]["evidence"]["rule"] == "loss_spike" and records[2]["time"]
    metrics = (log_dir / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, row.split(","))) for row in metrics[1:]]
    levels = {int(r["step"]): float(r["precision/level"]) for r in rows if r.get("precision/level")}
    # metrics sit at Lightning's x-axis (step N's batch is logged at N - 1), like train_loss
    assert levels[9] == 0.0 and levels[step_down.step - 1] == 1.0 and levels[289] == 1.0
    interval = [float(r["guard/snapshot_interval"]) for r in rows if r.get("guard/snapshot_interval")]
    cost = [float(r["guard/snapshot_ms"]) for r in rows if r.get("guard/snapshot_ms")]
    assert len(interval) >= 25 and set(interval) == {1.0} and len(cost) >= 25 and all(c > 0 for c in cost)
    hparams = yaml.unsafe_load(  # the model hparams hold a tuple
        (log_dir / "hparams.yaml").read_text())
    assert hparams["precision_plan"] == "bf16 -> fp32"
    assert any("step_down bf16 -> fp32" in line for line in hparams["precision_decisions"])


def test_a_spike_on_the_last_rung_rolls_back_and_continues(tmp_path: Path) -> None:
    model = TinyRegression()
    trainer, plugin = fit(tmp_path, model, GuardConfig(snapshot_every=1), max_steps=250, callbacks=[LrBoost(at=150)],
                          recipe="bf16")
    assert kinds(plugin) == ["plan", "rollback", "hold"] and trainer.global_step == 250
    rollback, hold = guard_decisions(plugin)
    assert rollback.to == "step 150" and rollback.evidence["steps_lost"] == 5
    assert "bf16 is the last rung of the ladder: continuing from the restored state" in hold.reason
    assert_healthy(model, trainer)
    assert data_loss(model) < 0.1


def test_nan_repeated_within_the_window_is_divergence_and_steps_down(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(60, 90))
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer, plugin = fit(tmp_path, model, loggers=[CSVLogger(tmp_path), tb])
    assert kinds(plugin) == ["plan", "skip", "step_down"]
    skip, step_down = guard_decisions(plugin)
    assert (skip.step, step_down.step, step_down.rule) == (61, 91, "nonfinite_loss")
    assert step_down.evidence["repeat_of_step"] == 61 and step_down.evidence["update_skipped"] is True
    assert plugin.guard.rollbacks == 0 and trainer.global_step == 200 and plugin.state.index == 1
    assert_healthy(model, trainer)
    assert [c for c in trainer.callbacks if isinstance(c, DivergenceGuard)] == [plugin.guard]
    # TensorBoard got the text record of each decision
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert "precision/decisions/text_summary" in events.Tags()["tensors"]
    assert [e.value for e in events.Scalars("precision/level")][-1] == 1.0
    assert [e.value for e in events.Scalars("precision/skipped_steps")][-1] == 1.0


def test_isolated_nonfinite_steps_are_each_skipped(tmp_path: Path) -> None:
    trainer, plugin = fit(tmp_path, TinyRegression(nan_at=(30, 60, 90)), GuardConfig(repeat_window=20),
                          max_steps=120, recipe="bf16")
    assert kinds(plugin) == ["plan", "skip", "skip", "skip"] and trainer.global_step == 120


def test_divergence_persisting_on_the_last_rung_stops_with_the_reason(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(60, 90, 120))
    trainer, plugin = fit(tmp_path, model, GuardConfig(cooldown=10, snapshot_every=1), max_steps=200)
    assert kinds(plugin) == ["plan", "skip", "step_down", "stop"]
    stop = plugin.decisions.decisions[-1]
    assert stop.step == 121 and stop.to == "stopped"
    assert ("fp32 is the last rung of the ladder and diverged again within repeat_window=100 steps of step 91"
            in stop.reason)
    assert 115 <= stop.evidence["snapshot_step"] <= 120 and "weights restored to step" in stop.reason
    assert trainer.global_step == 121 and trainer.should_stop
    assert_healthy(model, trainer)  # the final weights are the last verified ones


def test_stop_can_raise_and_max_rollbacks_is_enforced(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match="max_rollbacks=0 reached"):
        fit(tmp_path, TinyRegression(), GuardConfig(max_rollbacks=0, on_stop="raise"), max_steps=100,
            callbacks=[LrBoost(at=40)])


def test_a_repeat_within_the_cooldown_holds(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(60, 70, 80))
    trainer, plugin = fit(tmp_path, model, GuardConfig(cooldown=50), max_steps=120, plugin_cls=ThreeRungPrecision)
    assert kinds(plugin) == ["plan", "skip", "step_down", "hold"]
    assert "within the cooldown" in plugin.decisions.decisions[-1].reason and plugin.state.index == 1
    assert trainer.global_step == 120
    assert_healthy(model, trainer)


def test_promotion_after_healthy_steps(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(60, 70))
    trainer, plugin = fit(tmp_path, model, GuardConfig(promote_after=30), max_steps=120)
    assert kinds(plugin) == ["plan", "skip", "step_down", "promote"]
    promote = plugin.decisions.decisions[-1]
    assert (promote.from_, promote.to, promote.step) == ("fp32", "bf16", 101)
    assert plugin.state.index == 0


def test_guard_can_be_turned_off(tmp_path: Path) -> None:
    plugin = CpuLadderPrecision(print_plan=False, guard=False)
    trainer = Trainer(max_steps=5, plugins=[plugin], accelerator="cpu", default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyRegression())
    assert plugin.guard is None and not any(isinstance(c, DivergenceGuard) for c in trainer.callbacks)
    assert read_jsonl(tmp_path / JSONL_NAME)[0]["kind"] == "plan"
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))


def _read_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the guard reads step t's values at the end of step t + 1 and cannot look before the update;
    emulate that on CPU."""
    monkeypatch.setattr(DivergenceGuard, "_reads_late", staticmethod(lambda device: True))


def test_read_late_with_a_fused_optimizer_the_update_is_skipped_on_the_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_late(monkeypatch)
    model, recorder = TinyRegression(nan_at=(60,), fused=True), StepRecorder()
    trainer, plugin = fit(tmp_path, model, max_steps=100, callbacks=[recorder])
    assert kinds(plugin) == ["plan", "skip"]
    skip = guard_decisions(plugin)[0]
    assert (skip.step, skip.evidence["step"], skip.evidence["steps_lost"]) == (62, 61, 1)  # seen one step late
    assert torch.equal(recorder.params[61], recorder.params[60]) and recorder.adam_steps[100] == 99
    assert not any(hasattr(o, "found_inf") for o in trainer.optimizers)  # the flag lives for one step only
    assert_healthy(model, trainer)


def test_read_late_without_a_device_side_skip_rolls_back_a_few_steps_and_reads_all_before_checkpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_late(monkeypatch)

    class Spy(ModelCheckpoint):
        """Records, at each step, how many steps the guard has not read yet when checkpointing runs."""

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.pending[trainer.global_step] = len(trainer.precision_plugin.guard._pending)
            super().on_train_batch_end(trainer, pl_module, *args)

    spy = Spy(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    spy.pending = {}
    model = TinyRegression(nan_at=(60,))
    trainer, plugin = fit(tmp_path, model, GuardConfig(snapshot_every=1), max_steps=100, callbacks=[spy])
    assert kinds(plugin) == ["plan", "rollback"]  # an isolated bad batch: no step-down
    rollback = guard_decisions(plugin)[0]
    assert rollback.step == 62 and rollback.evidence["step"] == 61 and rollback.evidence["update_skipped"] is False
    # the NaN at step 61 is read at the end of step 62; the verified copy is of step 58 (step 60's copy waited
    # for step 61's values): steps 59 to 62 are lost
    assert rollback.to == "step 58" and rollback.evidence["steps_lost"] == 4
    assert all(spy.pending[s] == 0 for s in range(10, 101, 10))  # everything read before every checkpoint
    assert spy.pending[33] == 1  # otherwise one step is in flight
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        assert all(torch.isfinite(v).all() for v in torch.load(path, weights_only=False)["state_dict"].values())
    assert_healthy(model, trainer)


class ManualRegression(TinyRegression):
    """The same model with manual optimization (one optimizer, loss returned from training_step)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.lr_schedulers().step()
        return loss


def test_manual_optimization_is_guarded(tmp_path: Path) -> None:
    model, recorder = ManualRegression(nan_at=(40,)), StepRecorder()
    trainer, plugin = fit(tmp_path, model, max_steps=60, callbacks=[recorder])
    assert kinds(plugin) == ["plan", "skip"] and guard_decisions(plugin)[0].step == 41
    assert trainer.global_step == 60 and torch.equal(recorder.params[41], recorder.params[40])
    assert_healthy(model, trainer)


def test_a_second_fit_on_the_same_trainer_does_not_duplicate_records(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(30,))
    trainer, plugin = fit(tmp_path, model, max_steps=50)
    trainer.fit_loop.epoch_loop.max_steps = 80
    trainer.fit(model)  # setup (convert_module) runs again
    records = read_jsonl(Path(trainer.log_dir) / JSONL_NAME)
    assert len({(r["kind"], r["step"], r["wall_time"]) for r in records}) == len(records)
    assert [r["kind"] for r in records if r["kind"] not in ("swap", "snapshot")] == ["plan", "skip"]
    assert [c for c in trainer.callbacks if isinstance(c, DivergenceGuard)] == [plugin.guard]


def test_promotion_never_returns_to_delayed_scaling() -> None:
    """TE keeps stale amax history after DelayedScaling -> other -> DelayedScaling: never promote into it."""
    from types import SimpleNamespace

    from lightning_te_moe import Plan, RecipeSpec, Rung, probe_environment
    from lightning_te_moe.guard.decisions import DecisionLog
    from lightning_te_moe.policy.state import PrecisionState

    def rung(name: str, **settings) -> Rung:
        return Rung(RecipeSpec.of(name, **settings), RecipeSpec.of(name, **settings))

    plan = Plan(ladder=(rung("fp8_delayed"), rung("fp8_current", backward_override="high_precision"), rung("bf16")),
                environment=probe_environment(torch.device("cpu")))
    state, log = PrecisionState(plan, index=2), DecisionLog()
    guard = DivergenceGuard(state, log, GuardConfig(promote_after=5))
    trainer = SimpleNamespace(current_epoch=0)
    guard.healthy_steps = 5
    guard._maybe_promote(trainer, 100)
    assert state.index == 1 and log.decisions[-1].kind == "promote"
    guard.healthy_steps = 50
    guard._maybe_promote(trainer, 200)
    assert state.index == 1 and guard.promote_floor == 1 and log.count("promote") == 1


def test_rollback_from_the_last_checkpoint(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_last=True, save_top_k=0)
    model = TinyRegression()
    trainer, plugin = fit(tmp_path, model, GuardConfig(restore_from="checkpoint"), max_steps=100,
                          callbacks=[ckpt, LrBoost(at=70)])
    rollback, step_down = guard_decisions(plugin)
    assert (rollback.kind, rollback.to) == ("rollback", "step 60") and 73 <= rollback.step <= 80
    assert rollback.evidence["restored_from"].endswith("last.ckpt") and step_down.to == "fp32"
    assert trainer.global_step == 100 and plugin.guard.snapshots.good is None
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 100
    assert_healthy(model, trainer)


def test_rollback_from_checkpoint_needs_save_last_and_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_last=True\)"):
        fit(tmp_path, TinyRegression(), GuardConfig(restore_from="checkpoint"), max_steps=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=50, save_last=True, save_top_k=0)
    trainer, plugin = fit(tmp_path, TinyRegression(), GuardConfig(restore_from="checkpoint", warmup=5),
                          max_steps=100, callbacks=[ckpt, LrBoost(at=10)])
    stop = plugin.decisions.decisions[-1]
    assert stop.kind == "stop" and "no checkpoint was written yet" in stop.reason and trainer.global_step < 20
