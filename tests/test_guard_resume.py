"""Resume from a checkpoint saved after a step-down: unchanged arguments keep the rung, history and guard state;
changed precision arguments are followed, with the reason recorded; autotune runs once per run."""

from pathlib import Path

import pytest
import torch
from guard_support import CpuLadderPrecision, TinyRegression, read_jsonl
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_te_moe import GuardConfig
from lightning_te_moe.guard.sinks import JSONL_NAME


def trainer_for(tmp_path: Path, plugin: CpuLadderPrecision, max_steps: int, version: str) -> Trainer:
    return Trainer(max_steps=max_steps, plugins=[plugin], accelerator="cpu", default_root_dir=tmp_path,
                   logger=CSVLogger(tmp_path, version=version), enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=10)


def stepped_down_checkpoint(tmp_path: Path, **plugin_args) -> tuple[Path, CpuLadderPrecision]:
    """80 steps of bf16 -> fp32 with NaN losses at steps 51 and 61 (skipped, then a step-down), saved."""
    first = CpuLadderPrecision(print_plan=False, guard_config=GuardConfig(cooldown=500), **plugin_args)
    trainer = trainer_for(tmp_path, first, 80, "first")
    trainer.fit(TinyRegression(nan_at=(50, 60)))
    assert first.state.index == 1 and first.decisions.count("step_down") == 1 and first.decisions.count("skip") == 1
    ckpt = tmp_path / "after_step_down.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, first


def resume(tmp_path: Path, ckpt: Path, **plugin_args) -> tuple[Trainer, CpuLadderPrecision]:
    second = CpuLadderPrecision(print_plan=False, guard_config=GuardConfig(cooldown=500), **plugin_args)
    resumed = trainer_for(tmp_path, second, 120, "second")
    resumed.fit(TinyRegression(), ckpt_path=ckpt)
    assert resumed.global_step == 120
    return resumed, second


def test_resume_with_the_same_arguments_keeps_rung_history_and_guard_state(tmp_path: Path) -> None:
    ckpt, first = stepped_down_checkpoint(tmp_path)
    history, guard_state = first.decisions.state_dict(), first.guard.guard_state()
    resumed, second = resume(tmp_path, ckpt)
    assert second.state.index == 1 and second.precision == "32-true"
    assert second.decisions.state_dict()[:len(history)] == history
    decision = second.decisions.decisions[len(history)]
    assert (decision.kind, decision.step, decision.to, decision.rule) == ("resume", 80, "fp32", "checkpoint")
    assert "precision arguments unchanged" in decision.reason
    assert second.guard.guard_state()["last_step_down"] == guard_state["last_step_down"] == 61
    assert second.guard.skips == 1 and second.guard.last_incident == 61
    # the new log dir's audit file starts with the checkpoint's history, then the resume
    records = read_jsonl(Path(resumed.log_dir) / JSONL_NAME)
    guard_kinds = ("skip", "step_down")
    assert [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] in guard_kinds] == [
        h for h in history if h["kind"] in guard_kinds]
    assert [r["kind"] for r in records if r["kind"] != "snapshot"][-1] == "resume"
    # the guard's own state round-trips through the plugin's state_dict, not a callback entry
    saved = torch.load(ckpt, weights_only=False)
    assert saved["CpuLadderPrecision"]["guard"]["last_step_down"] == 61
    assert not any("DivergenceGuard" in key for key in saved.get("callbacks", {}))


@pytest.mark.parametrize(("args", "plan", "change"), [
    ({"recipe": "bf16"}, "bf16", "recipe: 'auto' -> 'bf16'"),
    ({"deny": ["bf16"]}, "fp32", "deny: [] -> ['bf16']"),
])
def test_resume_with_changed_precision_arguments_follows_them_and_says_so(tmp_path: Path, args: dict, plan: str,
                                                                          change: str) -> None:
    ckpt, _ = stepped_down_checkpoint(tmp_path)
    resumed, second = resume(tmp_path, ckpt, **args)
    assert second.plan.summary() == plan and second.state.index == 0
    decision = next(d for d in second.decisions.decisions if d.kind == "resume")
    assert (decision.from_, decision.to, decision.rule) == ("fp32", plan, "request")
    expected = f"precision arguments changed since the checkpoint ({change}): following the new arguments"
    assert expected in decision.reason
    assert "the checkpoint's plan bf16 -> fp32 at rung fp32 is not resumed" in decision.reason
    assert list(decision.evidence["changed"]) == list(args)
    assert second.precision == {"bf16": "bf16-mixed", "fp32": "32-true"}[plan]


def test_autotune_runs_once_per_run_and_a_resume_does_not_undo_a_step_down(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Autotune needs a GPU to time; its timing step is replaced here, the once-per-run logic is the plugin's."""
    from lightning_te_moe.policy import autotune
    from lightning_te_moe.policy.autotune import AutotuneResult

    calls = []

    def fake_autotune(model, env, request, tokens):
        plugin = CpuLadderPrecision(print_plan=False)
        calls.append(request.recipe)
        tuned = plugin.make_plan(torch.device("cpu"))
        result = AutotuneResult({"bf16": 1.0, "fp32": 2.0}, "bf16", "bf16", "autotune kept bf16 (timings injected)")
        return tuned, result, {"tokens": tokens}

    monkeypatch.setattr(autotune, "autotune_model", fake_autotune)
    ckpt, first = stepped_down_checkpoint(tmp_path, autotune=True)
    tuned = [d for d in first.decisions.decisions if d.kind == "autotune"]
    assert calls == ["auto"] and len(tuned) == 1 and tuned[0].step == 0  # once, at the first step
    resumed, second = resume(tmp_path, ckpt, autotune=True)
    assert calls == ["auto"]  # not again on resume
    assert second.state.index == 1 and second.plan.summary() == "bf16 -> fp32"  # the step-down stands
    decision = next(d for d in second.decisions.decisions if d.kind == "resume")
    assert "autotune=True does not run again on resume" in decision.reason and decision.to == "fp32"
    assert second.decisions.count("autotune") == 1


def test_a_resume_before_setup_with_changed_arguments_plans_from_the_new_ones() -> None:
    """Strategies that restore before setup: the plugin plans from its new arguments, not the checkpoint's."""
    saved = CpuLadderPrecision(print_plan=False).make_plan(torch.device("cpu"))
    plugin = CpuLadderPrecision("fp32", print_plan=False)
    plugin.load_state_dict({"plan": saved.to_dict(), "rung": 1, "decisions": []})
    assert plugin.plan.summary() == "fp32" and plugin.state.index == 0
    assert plugin.decisions.decisions[-1].rule == "request"
    same = CpuLadderPrecision(print_plan=False)
    same.load_state_dict({"plan": saved.to_dict(), "rung": 1, "decisions": []})
    assert same.plan.summary() == "bf16 -> fp32" and same.state.index == 1
    graphed = CpuLadderPrecision(print_plan=False, cuda_graphs=True)  # a rule may read cuda_graphs: a plan argument
    graphed.load_state_dict({"plan": saved.to_dict(), "rung": 1, "decisions": []})
    assert graphed.state.index == 0 and "cuda_graphs" in graphed.decisions.decisions[-1].reason
    # graphs compare as planned: a checkpoint that named cuda_graphs=False resumes under the default where the
    # plan runs none either (here, on the CPU), and one planned by the default resumes under an explicit equal choice
    named_off = CpuLadderPrecision(print_plan=False, cuda_graphs=False).make_plan(torch.device("cpu"))
    default = CpuLadderPrecision(print_plan=False)
    default.load_state_dict({"plan": named_off.to_dict(), "rung": 1, "decisions": []})
    assert default.state.index == 1 and default.decisions.decisions[-1].rule == "checkpoint"
    explicit = CpuLadderPrecision(print_plan=False, cuda_graphs=False)
    explicit.load_state_dict({"plan": saved.to_dict(), "rung": 1, "decisions": []})
    assert explicit.state.index == 1 and explicit.decisions.decisions[-1].rule == "checkpoint"
