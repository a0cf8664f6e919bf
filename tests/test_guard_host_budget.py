"""The guard's host copies against the host's memory: the estimate made before the first copy, and what the guard
does when the copies would not fit (roll back from the newest checkpoint, else keep no copy), on CPU."""

from pathlib import Path

import pytest
import torch
from guard_support import LrBoost, TinyRegression
from lightning.pytorch.callbacks import ModelCheckpoint
from test_guard_fit import assert_healthy, fit, guard_decisions

from lightning_te_moe import GuardConfig
from lightning_te_moe.guard import host_budget
from lightning_te_moe.guard.host_budget import available_host_bytes, pinned_size, read_meminfo, snapshot_bytes
from lightning_te_moe.guard.snapshot import SnapshotStore


def test_available_host_bytes_reads_memavailable(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       527826084 kB\nMemFree:        1000 kB\nMemAvailable:   465115392 kB\n")
    assert available_host_bytes(meminfo) == 465115392 * 1024
    assert read_meminfo(meminfo) == {"MemTotal": 527826084 * 1024, "MemFree": 1000 * 1024,
                                     "MemAvailable": 465115392 * 1024}
    meminfo.write_text("MemTotal:       527826084 kB\n")  # a kernel without the line
    assert available_host_bytes(meminfo) is None
    assert available_host_bytes(tmp_path / "missing") is None


def test_pinned_size_is_the_next_power_of_two() -> None:
    """29.9 GB, one GPT-OSS-20B snapshot a rank on 4 GPUs, takes 32 GiB pinned (measured 2026-11-27)."""
    assert pinned_size(29_900_000_000) == 32 * 2**30
    assert pinned_size(2**20) == 2**20 and pinned_size(2**20 + 1) == 2**21 and pinned_size(1) == 1


@pytest.mark.parametrize(("make", "states"), [
    (lambda params: torch.optim.AdamW(params, lr=1e-3), 2),
    (lambda params: torch.optim.AdamW(params, lr=1e-3, amsgrad=True), 3),
    (lambda params: torch.optim.SGD(params, lr=1e-3), 0),
    (lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9), 1),
    (lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.9, centered=True), 3),
])
def test_the_estimate_before_the_first_step_is_what_the_copy_holds_after_it(make, states: int) -> None:
    """Before the first step the optimizer has no state: each parameter counts with its optimizer's state tensors.
    After it, the estimate is what the snapshot the guard takes holds, byte for byte, and the estimate before
    differs from it only by the optimizer's scalar ``step`` tensors."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 4))
    net[2].weight.requires_grad_(False)  # frozen: neither copied nor given optimizer state
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = make(trainable)
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    params = sum(p.numel() * p.element_size() for p in trainable)
    before = snapshot_bytes(net, [optimizer])
    assert before == (1 + states) * params + buffers
    net(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    slot = SnapshotStore().capture(1, net, [optimizer], [], None, verified=True)
    assert snapshot_bytes(net, [optimizer]) == slot.nbytes
    scalars = sum(t.numel() * t.element_size() for key, t in slot.tensors.items()
                  if key[0] == "optimizer" and t.dim() == 0)
    assert slot.nbytes - scalars == before


def _tight_host(monkeypatch: pytest.MonkeyPatch, available: int = 2**10) -> None:
    monkeypatch.setattr(host_budget, "available_host_bytes", lambda: available)


def test_copies_over_the_budget_roll_back_from_the_last_checkpoint(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run as test_rollback_from_the_last_checkpoint, with the default restore_from='memory' on a host
    with 1 KiB available: the guard says so at step 0, keeps no host copy and restores last.ckpt."""
    _tight_host(monkeypatch)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_last=True, save_top_k=0)
    model = TinyRegression()
    trainer, plugin = fit(tmp_path, model, GuardConfig(), max_steps=100, callbacks=[ckpt, LrBoost(at=70)])
    budget = [d for d in plugin.decisions.decisions if d.rule == "host_memory_budget"]
    assert [(d.kind, d.step, d.to) for d in budget] == [("snapshot", 0, "checkpoint")]
    assert "host_memory_budget=0.6" in budget[0].reason and "newest checkpoint" in budget[0].reason
    assert budget[0].evidence["available_gib"] == round(2**10 / 2**30, 2) and budget[0].evidence["ranks_on_host"] == 1
    rollback, step_down = guard_decisions(plugin)
    assert (rollback.kind, rollback.to) == ("rollback", "step 60") and 73 <= rollback.step <= 80
    assert rollback.evidence["restored_from"].endswith("last.ckpt") and step_down.to == "fp32"
    assert plugin.guard.snapshots.good is None and plugin.guard.snapshots.nbytes == 0
    assert trainer.global_step == 100
    assert_healthy(model, trainer)


def test_copies_over_the_budget_without_a_checkpoint_keep_none_and_step_down_without_a_rollback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No checkpoint to fall back to: no host copy, and a blow-up steps down from where it is (as rollback='never');
    training goes on to the end."""
    _tight_host(monkeypatch)
    model = TinyRegression()
    with pytest.warns(UserWarning, match="no ModelCheckpoint"):
        trainer, plugin = fit(tmp_path, model, GuardConfig(), max_steps=100, callbacks=[LrBoost(at=70)])
    budget = [d for d in plugin.decisions.decisions if d.rule == "host_memory_budget"]
    assert [(d.kind, d.to) for d in budget] == [("snapshot", "none")]
    assert "ModelCheckpoint(save_last=True)" in budget[0].reason and "host_memory_budget" in budget[0].reason
    kinds = [d.kind for d in guard_decisions(plugin)]
    assert "rollback" not in kinds and kinds[0] == "step_down" and "stop" not in kinds
    assert plugin.guard.snapshots.good is None and trainer.global_step == 100


def test_copies_within_the_budget_change_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tight_host(monkeypatch, available=2**40)
    trainer, plugin = fit(tmp_path, TinyRegression(), GuardConfig(), max_steps=20)
    assert not [d for d in plugin.decisions.decisions if d.rule == "host_memory_budget"]
    assert plugin.guard.restore_from == "memory" and plugin.guard.snapshots.good is not None


def test_an_unknown_host_memory_keeps_the_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where MemAvailable cannot be read (not Linux) the guard cannot tell: it keeps its copies, as before."""
    monkeypatch.setattr(host_budget, "available_host_bytes", lambda: None)
    trainer, plugin = fit(tmp_path, TinyRegression(), GuardConfig(), max_steps=5)
    assert plugin.guard.restore_from == "memory" and plugin.guard.snapshots.good is not None


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_host_memory_budget_is_a_share(budget: float) -> None:
    with pytest.raises(ValueError, match=r"host_memory_budget is a share of the host's available memory in \(0, 1\]"):
        GuardConfig(host_memory_budget=budget)
