"""On resume the setup's records (plan, swap) wait until the checkpoint is read: its history replaces them, or,
when it has no precision state, they go out as usual. The append-only audit file so stays in time order."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from guard_support import read_jsonl
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_te_moe import TEMoEPrecision
from lightning_te_moe.guard import DecisionLog
from lightning_te_moe.guard.sinks import JSONL_NAME


def test_held_decisions_reach_sinks_on_release_or_never_when_a_history_replaces_them() -> None:
    log, seen = DecisionLog(), []
    log.record("plan", "before")
    log.hold()
    log.record("swap", "held")
    log.add_sink(lambda d: seen.append(d.reason))  # replays what is not held
    assert seen == ["before"]
    log.release()
    assert seen == ["before", "held"]
    log.record("step_down", "after")
    assert seen == ["before", "held", "after"]

    log.hold()
    log.record("plan", "superseded")
    log.load_state_dict([{"kind": "plan", "reason": "from the checkpoint", "wall_time": 1.0}])
    log.record("resume", "resumed")
    assert seen[3:] == ["resumed"] and [d.reason for d in log.decisions] == ["from the checkpoint", "resumed"]


def _trainer(tmp_path: Path, plugins: list, max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, plugins=plugins, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1)


def test_resume_from_a_checkpoint_without_precision_state_still_records_the_plan(tmp_path: Path) -> None:
    first = _trainer(tmp_path / "first", [], 2)
    first.fit(BoringModel())
    ckpt = tmp_path / "plain.ckpt"
    first.save_checkpoint(ckpt)

    plugin = TEMoEPrecision(print_plan=False)
    _trainer(tmp_path / "second", [plugin], 4).fit(BoringModel(), ckpt_path=ckpt)
    kinds = [r["kind"] for r in read_jsonl(tmp_path / "second" / JSONL_NAME)]
    assert kinds == [d.kind for d in plugin.decisions.decisions] and kinds[0] == "plan"
