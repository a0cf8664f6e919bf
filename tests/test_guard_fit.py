"""A real Trainer.fit with provoked divergence on CPU (bf16 -> fp32 ladder): step-down, rollback, stop."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from guard_support import CpuLadderPrecision, LrBoost, TinyRegression, read_jsonl
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_te_moe import DivergenceError, DivergenceGuard, GuardConfig
from lightning_te_moe.guard.sinks import JSONL_NAME


def fit(tmp_path: Path, model: TinyRegression, config: GuardConfig = GuardConfig(), max_steps: int = 200,
        callbacks: list = (), loggers: list = None, **kwargs) -> tuple[Trainer, CpuLadderPrecision]:
    plugin = CpuLadderPrecision(print_plan=False, guard_config=config)
    trainer = Trainer(max_steps=max_steps, plugins=[plugin], accelerator="cpu", devices=1,
                      default_root_dir=tmp_path, logger=loggers if loggers is not None else CSVLogger(tmp_path),
                      callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=10, **kwargs)
    trainer.fit(model)
    return trainer, plugin


def kinds(plugin: CpuLadderPrecision) -> list[str]:
    """Decision kinds, without the expert swap's report (not the guard's business)."""
    return [d.kind for d in plugin.decisions.decisions if d.kind != "swap"]


def guard_decisions(plugin: CpuLadderPrecision) -> list:
    return [d for d in plugin.decisions.decisions if d.kind not in ("plan", "swap")]


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


def test_lr_blowup_rolls_back_and_steps_down(tmp_path: Path) -> None:
    model = TinyRegression()
    boost = LrBoost(at=150)
    trainer, plugin = fit(tmp_path, model, GuardConfig(rollback="always"), max_steps=300, callbacks=[boost])
    assert trainer.global_step == 300 and boost.fired_at == 150
    assert kinds(plugin) == ["plan", "rollback", "step_down"]
    rollback, step_down = guard_decisions(plugin)
    assert rollback.step == step_down.step and 150 < step_down.step <= 160
    assert rollback.to == "step 100" and rollback.evidence["snapshot_step"] == 100
    assert (step_down.from_, step_down.to, step_down.rule) == ("bf16", "fp32", "loss_spike")
    assert plugin.state.index == 1 and plugin.precision == "32-true"
    assert_healthy(model, trainer)
    # the learning rate came back with the optimizer state: no trace of the 1e4 boost
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-2
    assert trainer.callback_metrics["train_loss"] < 0.2
    # the audit file, the CSV metrics and hparams
    log_dir = Path(trainer.log_dir)
    records = read_jsonl(log_dir / JSONL_NAME)
    assert [r["kind"] for r in records if r["kind"] != "swap"] == kinds(plugin)
    assert records[-1]["from"] == "bf16" and records[-1]["evidence"]["rule"] == "loss_spike" and records[2]["time"]
    metrics = (log_dir / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    level = [row.split(",")[header.index("precision/level")] for row in metrics[1:]]
    steps = [int(row.split(",")[header.index("step")]) for row in metrics[1:]]
    levels = {s: float(v) for s, v in zip(steps, level) if v}
    # metrics sit at Lightning's x-axis (step N's batch is logged at N - 1), like train_loss
    assert levels[9] == 0.0 and levels[step_down.step - 1] == 1.0 and levels[289] == 1.0
    hparams = yaml.unsafe_load(  # the model hparams hold a tuple
        (log_dir / "hparams.yaml").read_text())
    assert hparams["precision_plan"] == "bf16 -> fp32"
    assert any("step_down bf16 -> fp32" in line for line in hparams["precision_decisions"])


def test_nan_loss_rolls_back_by_default_and_training_completes(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(120,))
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer, plugin = fit(tmp_path, model, max_steps=200, loggers=[CSVLogger(tmp_path), tb])
    assert trainer.global_step == 200
    assert kinds(plugin) == ["plan", "rollback", "step_down"]
    rollback, step_down = guard_decisions(plugin)
    assert rollback.step == step_down.step == 121 and rollback.rule == "nonfinite_loss"
    assert rollback.evidence["value"] == "nan" and rollback.evidence["skipped_batches"] == 21
    assert plugin.guard.rollbacks == 1
    assert_healthy(model, trainer)
    assert [c for c in trainer.callbacks if isinstance(c, DivergenceGuard)] == [plugin.guard]
    # TensorBoard got the text record of each decision
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert "precision/decisions/text_summary" in events.Tags()["tensors"]
    assert [e.value for e in events.Scalars("precision/level")][-1] == 1.0


def test_divergence_on_the_bottom_rung_stops_with_the_reason(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(60, 90))
    trainer, plugin = fit(tmp_path, model, GuardConfig(cooldown=10, snapshot_every=25), max_steps=200)
    assert kinds(plugin) == ["plan", "rollback", "step_down", "rollback", "stop"]
    stop = plugin.decisions.decisions[-1]
    assert stop.step == 91 and "fp32 is the last rung of the ladder and diverged" in stop.reason
    assert stop.to == "stopped" and "weights restored to step 75" in stop.reason
    assert trainer.global_step == 91 and trainer.should_stop
    assert_healthy(model, trainer)  # the final weights are the last known-good ones


def test_stop_can_raise(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match="max_rollbacks=0 reached"):
        fit(tmp_path, TinyRegression(nan_at=(30,)), GuardConfig(max_rollbacks=0, on_stop="raise"), max_steps=100)


def test_spike_within_cooldown_holds(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(60, 80))
    trainer, plugin = fit(tmp_path, model, GuardConfig(cooldown=50), max_steps=120)
    assert kinds(plugin) == ["plan", "rollback", "step_down", "rollback", "hold"]
    assert "within the cooldown" in plugin.decisions.decisions[-1].reason
    assert trainer.global_step == 120
    assert_healthy(model, trainer)


def test_promotion_after_healthy_steps(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(60,))
    trainer, plugin = fit(tmp_path, model, GuardConfig(promote_after=30), max_steps=120)
    assert kinds(plugin) == ["plan", "rollback", "step_down", "promote"]
    promote = plugin.decisions.decisions[-1]
    assert (promote.from_, promote.to, promote.step) == ("fp32", "bf16", 91)
    assert plugin.state.index == 0


def test_guard_can_be_turned_off(tmp_path: Path) -> None:
    plugin = CpuLadderPrecision(print_plan=False, guard=False)
    trainer = Trainer(max_steps=5, plugins=[plugin], accelerator="cpu", default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyRegression())
    assert plugin.guard is None and not any(isinstance(c, DivergenceGuard) for c in trainer.callbacks)
    assert read_jsonl(tmp_path / JSONL_NAME)[0]["kind"] == "plan"
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(40,))  # NaN in the micro-batches of optimizer step 41
    trainer, plugin = fit(tmp_path, model, max_steps=60, accumulate_grad_batches=2)
    assert kinds(plugin) == ["plan", "rollback", "step_down"]
    assert guard_decisions(plugin)[0].step == 41 and trainer.global_step == 60
    assert plugin.guard.detector.series["loss"].seen < 60  # one value per optimizer step, not per micro-batch
    assert_healthy(model, trainer)


def test_lagged_read_as_on_cuda_decides_one_step_later_and_drains_before_checkpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the guard reads step t's values at the end of step t + 1; emulate that on CPU."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    start = DivergenceGuard.on_train_start

    def lagged_start(self, trainer, pl_module):
        start(self, trainer, pl_module)
        self._lag = 1

    monkeypatch.setattr(DivergenceGuard, "on_train_start", lagged_start)

    class Spy(ModelCheckpoint):
        """Records, at each step, how many steps the guard has not read yet when checkpointing runs."""

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.pending[trainer.global_step] = len(trainer.precision_plugin.guard._pending)
            super().on_train_batch_end(trainer, pl_module, *args)

    spy = Spy(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    spy.pending = {}
    model = TinyRegression(nan_at=(60,))
    trainer, plugin = fit(tmp_path, model, GuardConfig(snapshot_every=25), max_steps=100, callbacks=[spy])
    rollback, step_down = guard_decisions(plugin)
    assert rollback.step == step_down.step == 62 and rollback.evidence["step"] == 61
    assert rollback.evidence["snapshot_step"] == 50
    assert all(spy.pending[s] == 0 for s in range(10, 101, 10))  # drained before every checkpoint
    assert spy.pending[33] == 1  # otherwise one step is in flight
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
    model = ManualRegression(nan_at=(40,))
    trainer, plugin = fit(tmp_path, model, max_steps=60)
    assert kinds(plugin) == ["plan", "rollback", "step_down"] and guard_decisions(plugin)[0].step == 41
    assert trainer.global_step == 60
    assert_healthy(model, trainer)


def test_a_second_fit_on_the_same_trainer_does_not_duplicate_records(tmp_path: Path) -> None:
    model = TinyRegression(nan_at=(30,))
    trainer, plugin = fit(tmp_path, model, max_steps=50)
    trainer.fit_loop.epoch_loop.max_steps = 80
    trainer.fit(model)  # setup (convert_module) runs again
    records = read_jsonl(Path(trainer.log_dir) / JSONL_NAME)
    assert len({(r["kind"], r["step"], r["wall_time"]) for r in records}) == len(records)
    assert [r["kind"] for r in records if r["kind"] != "swap"] == ["plan", "rollback", "step_down"]
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
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_last=True, save_top_k=0)
    model = TinyRegression(nan_at=(50,))
    trainer, plugin = fit(tmp_path, model, GuardConfig(restore_from="checkpoint"), max_steps=100, callbacks=[ckpt])
    rollback, step_down = guard_decisions(plugin)
    assert (rollback.kind, rollback.step, rollback.to) == ("rollback", 51, "step 40")
    assert rollback.evidence["restored_from"].endswith("last.ckpt") and step_down.to == "fp32"
    assert trainer.global_step == 100 and plugin.guard.snapshot is None
    assert_healthy(model, trainer)


def test_rollback_from_checkpoint_needs_save_last_and_a_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_last=True\)"):
        fit(tmp_path, TinyRegression(), GuardConfig(restore_from="checkpoint"), max_steps=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=50, save_last=True, save_top_k=0)
    trainer, plugin = fit(tmp_path, TinyRegression(nan_at=(10,)), GuardConfig(restore_from="checkpoint"),
                          max_steps=100, callbacks=[ckpt])
    stop = plugin.decisions.decisions[-1]
    assert stop.kind == "stop" and "no checkpoint was written yet" in stop.reason and trainer.global_step == 11
