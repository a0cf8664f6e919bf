"""Resume from a checkpoint saved after a step-down: same rung, same history, same guard state."""

from pathlib import Path

from guard_support import CpuLadderPrecision, TinyRegression, read_jsonl
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_te_moe import GuardConfig
from lightning_te_moe.guard.sinks import JSONL_NAME


def trainer_for(tmp_path: Path, plugin: CpuLadderPrecision, max_steps: int, version: str) -> Trainer:
    return Trainer(max_steps=max_steps, plugins=[plugin], accelerator="cpu", default_root_dir=tmp_path,
                   logger=CSVLogger(tmp_path, version=version), enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=10)


def test_resume_after_step_down_keeps_rung_history_and_guard_state(tmp_path: Path) -> None:
    config = GuardConfig(cooldown=500)
    first = CpuLadderPrecision(print_plan=False, guard_config=config)
    trainer = trainer_for(tmp_path, first, 80, "first")
    trainer.fit(TinyRegression(nan_at=(50,)))
    assert first.state.index == 1 and first.decisions.count("step_down") == 1
    ckpt = tmp_path / "after_step_down.ckpt"
    trainer.save_checkpoint(ckpt)
    history = first.decisions.state_dict()
    guard_state = first.guard.guard_state()

    second = CpuLadderPrecision(print_plan=False, guard_config=config)
    resumed = trainer_for(tmp_path, second, 120, "second")
    model = TinyRegression()
    resumed.fit(model, ckpt_path=ckpt)

    assert second.state.index == 1 and second.precision == "32-true"
    assert second.decisions.state_dict()[:len(history)] == history
    resume = second.decisions.decisions[len(history)]
    assert (resume.kind, resume.step, resume.to) == ("resume", 80, "fp32")
    assert second.guard.guard_state()["last_step_down"] == guard_state["last_step_down"] == 51
    assert second.guard.rollbacks == 1
    assert resumed.global_step == 120
    # the new log dir's audit file starts with the checkpoint's history, then the resume
    records = read_jsonl(Path(resumed.log_dir) / JSONL_NAME)
    kinds = [r["kind"] for r in records]
    guard_kinds = ("rollback", "step_down")
    assert [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] in guard_kinds] == [
        h for h in history if h["kind"] in guard_kinds]
    assert kinds[-1] == "resume"
    # the guard's own state round-trips through the plugin's state_dict, not a callback entry
    import torch

    saved = torch.load(ckpt, weights_only=False)
    assert saved["CpuLadderPrecision"]["guard"]["last_step_down"] == 51
    assert not any("DivergenceGuard" in key for key in saved.get("callbacks", {}))
