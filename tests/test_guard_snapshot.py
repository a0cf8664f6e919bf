"""The guard's host snapshot: what it copies (only what changes), putting it back in place, reusing host memory,
the LR schedule after a rollback, TE's delayed-scaling history, and the interval chosen from measured costs."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from cpu_kinds import this_machines_cpu_plan

from lightning_te_moe import DivergenceGuard
from lightning_te_moe.guard.cadence import HEADROOM, SnapshotCadence
from lightning_te_moe.guard.snapshot import SnapshotStore


class LoraLike(torch.nn.Module):
    """A frozen 256 x 256 base with trainable rank-4 adapters and a buffer that forward changes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(256, 256).requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(256, 4) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(4, 256) * 0.1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.base(x) + x @ self.a @ self.b


def train(model: LoraLike, optimizer: Any, steps: int, scheduler: Any = None) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 256)).square().mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def state_of(model: LoraLike, optimizer: Any) -> dict[str, torch.Tensor]:
    out = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        out.update({f"opt{i}.{k}": v.clone() for k, v in optimizer.state[p].items()})
    return out


def test_only_trainable_parameters_their_optimizer_state_and_buffers_are_copied() -> None:
    model = LoraLike()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, optimizer, 2)
    store = SnapshotStore()
    store.capture(2, model, [optimizer], [], None, verified=True)
    adapters = 2 * 256 * 4 * 4
    assert store.good.nbytes == 3 * adapters + 2 * 4 + 8  # adapters, exp_avg, exp_avg_sq, 2 step counters, buffer
    assert store.nbytes < (256 * 256 + 256) * 4 / 5  # host memory: the frozen base (257 KiB) is never copied
    assert {key[0] for key in store.good.tensors} == {"param", "optimizer", "buffer"}


def test_restore_puts_everything_back_in_place_and_reuses_host_memory() -> None:
    model = LoraLike()
    optimizer = torch.optim.AdamW([model.a, model.b], lr=1e-2)
    train(model, optimizer, 3)
    store = SnapshotStore()
    first = store.capture(3, model, [optimizer], [], None, verified=True)
    before = state_of(model, optimizer)
    live = [model.a, model.b, *optimizer.state[model.a].values()]
    train(model, optimizer, 4)
    model.a.data.mul_(float("nan"))
    assert store.restore(model, [optimizer], [], None)["step"] == 3
    assert all(torch.equal(before[k], v) for k, v in state_of(model, optimizer).items())
    assert [model.a, model.b, *optimizer.state[model.a].values()] == live  # the same tensors, written in place
    # candidates: the next copy goes to a second host copy, then the first one's memory is reused
    train(model, optimizer, 1)
    second = store.capture(4, model, [optimizer], [], None, verified=False)
    assert second is not first and store.good is first and store.candidate is second
    assert store.verify(4) and store.good is second and store.candidate is None
    pointers = {k: t.data_ptr() for k, t in first.tensors.items()}
    third = store.capture(5, model, [optimizer], [], None, verified=False)
    assert third is first and {k: t.data_ptr() for k, t in third.tensors.items()} == pointers


def test_host_buffers_are_allocated_once_per_layout_for_both_copies_and_timed_apart_from_the_snapshot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned allocation is slow (and, on CUDA, an implicit synchronization): not the snapshot's recurring cost, which
    sets the interval, and not in the middle of the run. A slow allocator here: its time is ``alloc_ms``, not
    ``host_ms``; the first snapshot of a layout allocates both copies; later ones allocate nothing; buffers of an
    older layout (before AdamW created its state) are released."""
    import time

    from lightning_te_moe.guard import snapshot as snapshot_module

    allocations = []
    allocate = snapshot_module._host_buffer

    def slow(nbytes: int, pinned: bool) -> torch.Tensor:
        allocations.append(nbytes)
        time.sleep(0.2)
        return allocate(nbytes, pinned)

    monkeypatch.setattr(snapshot_module, "_host_buffer", slow)
    model = LoraLike()
    optimizer = torch.optim.AdamW([model.a, model.b], lr=1e-2)
    store = SnapshotStore()
    start = store.capture(0, model, [optimizer], [], None, verified=True)  # parameters only: no AdamW state yet
    assert len(allocations) == 2 and start.alloc_ms >= 400 and start.host_ms < 100
    train(model, optimizer, 1)
    probe = store.capture(1, model, [optimizer], [], None, verified=False)  # AdamW's state exists: a new layout
    assert len(allocations) == 4 and probe.alloc_ms >= 400 and probe.cost_ms() == probe.host_ms < 100
    allocated = start.alloc_ms + probe.alloc_ms
    assert store.verify(1) and store.good is probe
    full = probe.flat.numel()
    assert store.nbytes == 2 * full  # the parameters-only copy is released
    for step in (2, 3, 4):
        train(model, optimizer, 1)
        slot = store.capture(step, model, [optimizer], [], None, verified=False)
        assert slot.alloc_ms == 0 and store.verify(step)
    assert len(allocations) == 4 and store.nbytes == 2 * full
    assert store.alloc_ms == pytest.approx(allocated)


@pytest.mark.parametrize("pinned", [True, False])
def test_pinned_copies_it_drops_go_back_to_the_os(monkeypatch: pytest.MonkeyPatch, pinned: bool) -> None:
    """torch's host allocator keeps a freed pinned buffer cached, where nothing else can use it: the copies of an
    older layout (parameters only, before AdamW's state) and those ``release`` drops are given back, once per change;
    steady snapshots give back nothing, and unpinned (CPU) copies never call it. Pinning is simulated: no GPU here."""
    from lightning_te_moe.guard import snapshot as snapshot_module

    given_back = []
    monkeypatch.setattr(snapshot_module, "needs_pinning", lambda sources: pinned)
    monkeypatch.setattr(snapshot_module, "_host_buffer", lambda nbytes, pinned: torch.empty(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(snapshot_module, "_give_back_pinned", lambda: given_back.append(len(given_back)))
    model = LoraLike()
    optimizer = torch.optim.AdamW([model.a, model.b], lr=1e-2)
    store = SnapshotStore()
    store.capture(0, model, [optimizer], [], None, verified=True)  # parameters only: 2 copies, nothing dropped
    assert given_back == []
    train(model, optimizer, 1)
    store.capture(1, model, [optimizer], [], None, verified=False)  # the spare of the old layout is placed anew
    store.verify(1)  # the old layout's verified copy goes
    expected = [0, 1] if pinned else []
    assert given_back == expected
    for step in (2, 3):
        train(model, optimizer, 1)
        store.capture(step, model, [optimizer], [], None, verified=False)
        store.verify(step)
    assert given_back == expected  # the same two buffers, reused
    store.release()
    assert given_back == ([0, 1, 2] if pinned else [])


def test_release_drops_both_host_copies_and_the_next_capture_allocates_anew() -> None:
    """After a fit its host copies (tens of GB of pinned memory a rank for a sharded 20B model) can be given back."""
    model = LoraLike()
    optimizer = torch.optim.AdamW([model.a, model.b], lr=1e-2)
    train(model, optimizer, 2)
    store = SnapshotStore()
    store.capture(2, model, [optimizer], [], None, verified=True)
    train(model, optimizer, 1)
    store.capture(3, model, [optimizer], [], None, verified=False)
    assert store.nbytes > 0 and store.good is not None and store.candidate is not None
    store.release()
    assert store.nbytes == 0 and store.latest is None and store.good is None
    before = state_of(model, optimizer)
    again = store.capture(4, model, [optimizer], [], None, verified=True)
    assert store.good is again and store.nbytes == 2 * again.flat.numel()  # its own copy and the spare, allocated anew
    model.a.data.mul_(float("nan"))
    assert store.restore(model, [optimizer], [], None)["step"] == 4
    assert all(torch.equal(before[k], v) for k, v in state_of(model, optimizer).items())

def test_rng_states_come_back() -> None:
    model = LoraLike()
    optimizer = torch.optim.SGD([model.a, model.b], lr=1e-2)
    store = SnapshotStore()
    store.capture(0, model, [optimizer], [], None, verified=True)
    torch_draw, python_draw, numpy_draw = torch.rand(3), random.random(), numpy.random.rand()
    torch.rand(100), random.random(), numpy.random.rand(7)
    store.restore(model, [optimizer], [], None)
    assert torch.equal(torch.rand(3), torch_draw) and random.random() == python_draw
    assert numpy.random.rand() == numpy_draw


def test_optimizer_state_younger_than_the_snapshot_is_dropped() -> None:
    model, fresh = LoraLike(), LoraLike()
    optimizer = torch.optim.AdamW([model.a, model.b], lr=1e-2)
    store = SnapshotStore()
    store.capture(0, model, [optimizer], [], None, verified=True)
    train(model, optimizer, 2)
    store.restore(model, [optimizer], [], None)
    assert not optimizer.state and torch.equal(model.a, fresh.a)


def test_the_lr_schedule_rejoins_the_current_step_after_a_restore() -> None:
    """Rolled back from step 8 to step 3: the optimizer state is step 3's, the LR is the schedule's at step 8."""
    model = LoraLike()
    optimizer = torch.optim.AdamW([model.a, model.b], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    train(model, optimizer, 3, scheduler)
    store = SnapshotStore()
    store.capture(3, model, [optimizer], [scheduler], None, verified=True)
    for group in optimizer.param_groups:
        group["lr"] *= 1e4  # blown up by hand
    train(model, optimizer, 5, scheduler)
    store.restore(model, [optimizer], [scheduler], None)
    assert scheduler.last_epoch == 8 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 9)
    assert int(optimizer.state[model.a]["step"]) == 3


def test_the_loss_scaler_comes_back_and_is_copied_without_reading_it_on_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GradScaler.state_dict() reads the scale and growth tracker with .item() (a sync on CUDA): a snapshot copies
    the two tensors instead, and its growth settings."""
    model = LoraLike()
    optimizer = torch.optim.SGD([model.a, model.b], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    store = SnapshotStore()
    store.capture(0, model, [optimizer], [], scaler, verified=True)  # before the first loss: no scale tensor yet
    scaler.scale(torch.ones(()))  # creates the scale tensor
    scaler.update(new_scale=8.0)
    store.restore(model, [optimizer], [], scaler)
    assert scaler.get_scale() == 1024.0
    scaler._growth_tracker.fill_(2)
    for reader in ("state_dict", "get_scale", "_get_growth_tracker"):
        monkeypatch.setattr(scaler, reader, lambda: pytest.fail("a snapshot read the scaler on the host"))
    store.capture(1, model, [optimizer], [], scaler, verified=True)
    assert {key for key in store.good.tensors if key[0] == "scaler"} == {("scaler", "scale"),
                                                                         ("scaler", "growth_tracker")}
    monkeypatch.undo()
    scaler.update(new_scale=8.0)
    scaler._growth_tracker.zero_()
    scaler.set_growth_interval(100)
    store.restore(model, [optimizer], [], scaler)
    assert scaler.get_scale() == 1024.0 and int(scaler._growth_tracker) == 2 and scaler.get_growth_interval() == 3


class FakeRecipe:
    def __init__(self, delayed: bool) -> None:
        self._delayed = delayed

    def delayed(self) -> bool:
        return self._delayed


class FakeMeta:
    def __init__(self) -> None:
        self.scale = torch.ones(2)
        self.amax_history = torch.zeros(4, 2)


class FakeTEModule(torch.nn.Module):
    """The two methods and the ``fp8_meta`` layout of a TE module, as transformer_engine/pytorch/module/base.py
    has them (``get_fp8_meta_tensors`` clones, ``reset_fp8_meta_tensors`` copies in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.fp8_meta: dict[str, Any] = {"recipe": FakeRecipe(True), "scaling_fwd": FakeMeta(), "scaling_bwd": FakeMeta()}

    def get_fp8_meta_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {k: [self.fp8_meta[k].scale.clone(), self.fp8_meta[k].amax_history.clone()]
                for k in ("scaling_fwd", "scaling_bwd")}

    def reset_fp8_meta_tensors(self, tensors: dict[str, list[torch.Tensor]]) -> None:
        for key, (scale, history) in tensors.items():
            self.fp8_meta[key].scale.copy_(scale)
            self.fp8_meta[key].amax_history.copy_(history)


def test_te_delayed_scaling_history_comes_back_while_the_recipe_is_still_delayed_scaling() -> None:
    outer = torch.nn.Sequential(FakeTEModule())
    te_module = outer[0]
    optimizer = torch.optim.SGD(outer.parameters(), lr=1e-2)
    store = SnapshotStore()
    te_module.fp8_meta["scaling_fwd"].amax_history[0] = 3.0
    store.capture(1, outer, [optimizer], [], None, verified=True)
    history = te_module.fp8_meta["scaling_fwd"].amax_history
    history.fill_(float("nan"))
    details = store.restore(outer, [optimizer], [], None)
    assert details["te_modules_restored"] == 1 and history[0].tolist() == [3.0, 3.0] and history[1:].eq(0).all()
    te_module.fp8_meta["recipe"] = FakeRecipe(False)  # stepped down to a recipe without history
    details = store.restore(outer, [optimizer], [], None)
    assert details["te_modules_not_restored"] == ["0"]


def test_a_changed_set_of_trainable_parameters_is_a_clear_error() -> None:
    model = LoraLike()
    optimizer = torch.optim.SGD([model.a, model.b], lr=1e-2)
    store = SnapshotStore()
    store.capture(0, model, [optimizer], [], None, verified=True)
    model.b.requires_grad_(False)
    with pytest.raises(RuntimeError, match="trainable parameters changed since the guard's snapshot"):
        store.restore(model, [optimizer], [], None)


@pytest.mark.slow
def test_sharded_parameters_are_copied_and_restored_as_each_rank_s_local_shard(tmp_path: Path) -> None:
    """2 processes on gloo, a DTensor parameter sharded in two (as FSDP2 leaves it): each rank copies its half."""
    script = Path(__file__).with_name("guard_shard_script.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["local_shape"] == [8, 16] and rank["snapshot_bytes"] == rank["local_state_bytes"]
        assert rank["restored"] and rank["same_storage"]
    assert ranks[0]["local_sum"] != ranks[1]["local_sum"]  # different halves


def test_the_interval_keeps_snapshots_under_the_budget() -> None:
    cadence = SnapshotCadence(None, 0.02)
    assert cadence.proposal() is None and cadence.stats()["cost_share"] is None  # nothing measured yet
    for ms in (100.0, 98.0, 103.0):
        cadence.add_step(ms)
    cadence.add_snapshot(10.0, 1 << 20)
    assert cadence.proposal() == 7  # 10 ms every 5 steps of 100 ms is 2%: every 7, 1.4%, leaves room for drift
    cadence.agree(cadence.proposal())
    assert cadence.cost_share() == pytest.approx(0.02 * 5 / 7) and cadence.stats()["snapshot_bytes"] == 1 << 20
    cadence.add_snapshot(0.1, 1 << 20)
    cadence.add_snapshot(0.1, 1 << 20)
    assert cadence.proposal() == 1  # the median of the measured costs
    assert [s for s in range(5_000) if cadence.check_due(s)] == [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2024,
                                                                 3024, 4024]  # then every 1000 steps
    fixed = SnapshotCadence(7, 0.02)
    fixed.add_step(1.0)
    fixed.add_snapshot(100.0, 1)
    assert fixed.proposal() == 7 and not any(fixed.check_due(s) for s in range(100))


def drive(cadence: SnapshotCadence, steps: int, step_ms: float, snapshot_ms: float, start: int = 0,
          lag: int = 1) -> list[int]:
    """The guard's use of the cadence with fake timings: one step of ``step_ms`` after another (the first after the
    start untimed, as the guard does), each snapshot's cost known ``lag`` steps after it is taken (as a side-stream
    copy's on CUDA). Returns the steps after which a snapshot was taken, the start's included."""
    cadence.start(start)
    taken, pending = [start], [(start, snapshot_ms / 3, 1)]  # the starting state: no optimizer state yet, a third
    for now in range(start + 1, start + steps + 1):
        if now > start + 1:
            cadence.add_step(step_ms)
        while pending and pending[0][0] <= now - lag:
            cadence.add_snapshot(*pending.pop(0)[1:])
        if cadence.check_due(now):
            cadence.agree(cadence.proposal())
        if cadence.due(now):
            taken.append(now)
            pending.append((now, snapshot_ms, 3))
            cadence.mark(now)
    return taken


def test_warm_up_takes_one_probe_not_a_snapshot_every_step_and_the_first_check_sets_the_interval() -> None:
    """A 20B-like start: 50 ms snapshots against 100 ms steps. Before the first check only the probe after step 1
    (the first copy with optimizer state) is taken; its cost (not the starting state's) sets the interval at step 4:
    ceil(50 / (0.8 * 2% * 100)) = 32 steps."""
    cadence = SnapshotCadence(None, 0.02)
    assert drive(cadence, 130, step_ms=100.0, snapshot_ms=50.0) == [0, 1, 33, 65, 97, 129]
    assert cadence.interval == 32 and cadence.stats()["snapshot_ms"] == 50.0 and cadence.nbytes == 3
    assert cadence.cost_share() == pytest.approx(50 / (32 * 100)) and cadence.cost_share() <= 0.02
    # cheap snapshots: every step from the first check on (as often as the budget allows)
    cheap = SnapshotCadence(None, 0.02)
    assert drive(cheap, 8, step_ms=100.0, snapshot_ms=0.1) == [0, 1, 4, 5, 6, 7, 8]
    # a fixed interval is kept from the start, with no probe
    assert drive(SnapshotCadence(5, 0.02), 20, step_ms=100.0, snapshot_ms=50.0) == [0, 5, 10, 15, 20]


def test_checks_count_from_the_start_of_the_fit() -> None:
    """A resumed fit (starting at step 1000) measures afresh: probe at 1001, first check at 1004, as on every rank."""
    cadence = SnapshotCadence(None, 0.02)
    drive(cadence, 10, step_ms=100.0, snapshot_ms=50.0)
    assert drive(cadence, 40, step_ms=100.0, snapshot_ms=50.0, start=1000) == [1000, 1001, 1033]
    cadence.start(1000)
    assert [s for s in range(1000, 1100) if cadence.check_due(s)] == [1004, 1008, 1016, 1032, 1064]


def test_without_a_measurement_at_a_check_there_is_still_no_interval_and_a_probe_is_due_again() -> None:
    """A rollback restored the starting state before the probe was taken (it holds the state at step 2 from then
    on): nothing was measured by step 4, so no interval is set and the probe is taken next."""
    cadence = SnapshotCadence(None, 0.02)
    cadence.start(0)
    cadence.mark(2)  # the rollback
    assert not cadence.due(3)
    cadence.add_step(100.0)
    assert cadence.check_due(4) and cadence.proposal() is None
    cadence.agree(None)
    assert cadence.interval is None and cadence.due(4) and cadence.stats()["interval"] is None
    cadence.mark(4)
    assert not cadence.due(5)


def test_a_snapshot_of_another_size_starts_the_cost_measurements_again() -> None:
    cadence = SnapshotCadence(None, 0.02)
    cadence.add_snapshot(1.0, 100)  # parameters only (the optimizer has no state yet)
    cadence.add_snapshot(3.0, 300)
    cadence.add_snapshot(5.0, 300)
    assert cadence.snapshot_ms == 4.0 and cadence.nbytes == 300


def test_a_fit_snapshots_at_the_measured_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose trainable state (25 MB) costs a large share of its step: no snapshot at every warm-up step
    (the starting state and one probe), then an interval that keeps snapshots under 2%, and the decision says so."""
    from guard_support import CpuLadderPrecision, TinyRegression
    from lightning.pytorch import Trainer

    class Heavy(TinyRegression):
        def __init__(self) -> None:
            super().__init__()
            self.extra = torch.nn.Parameter(torch.zeros(2_000_000))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + 0.0 * self.extra[:1].sum()

    captures: list[tuple[int, Any]] = []  # (step, interval in force)
    capture = DivergenceGuard._capture

    def spy(guard: DivergenceGuard, trainer: Any, pl_module: Any, step: int, verified: bool) -> None:
        captures.append((step, guard.cadence.interval))
        capture(guard, trainer, pl_module, step, verified)

    monkeypatch.setattr(DivergenceGuard, "_capture", spy)
    plugin = CpuLadderPrecision("bf16", print_plan=False)
    trainer = Trainer(max_steps=70, plugins=[plugin], accelerator="cpu", default_root_dir=tmp_path, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Heavy())
    decisions = [d for d in plugin.decisions.decisions if d.kind == "snapshot"]
    assert decisions, "the interval is a recorded decision"
    # warm-up: the starting state, the probe after step 1, nothing else until the first check sets the interval
    assert captures[:2] == [(0, None), (1, None)] and decisions[0].step == 4
    assert not [step for step, _ in captures if 1 < step < 4]
    assert all(step - before >= interval for (before, _), (step, interval) in itertools.pairwise(captures[1:]))
    assert decisions[0].evidence["snapshot_bytes"] == 3 * 2_000_321 * 4 + 5 * 4  # the probe's: Adam's state exists
    last = decisions[-1].evidence
    assert last["snapshot_bytes"] == 3 * 2_000_321 * 4 + 5 * 4  # parameters, Adam moments, 5 step counters
    ratio = last["snapshot_ms"] / (HEADROOM * 0.02 * last["step_ms"])  # the interval is its ceiling (unrounded)
    assert last["interval"] - 1 - 1e-3 <= ratio <= last["interval"] + 1e-3
    assert last["interval"] > 1 and last["cost_share"] <= 0.02
    assert plugin.guard.cadence.interval >= 1 and plugin.guard.snapshots.nbytes <= 2 * last["snapshot_bytes"] + 4096


@pytest.mark.slow
def test_the_full_size_benchmark_runs_and_reports_what_the_docs_need(tmp_path: Path) -> None:
    """benchmarks/guard_snapshot.py on its small model (CPU): steps without and with the guard, the snapshot's bytes,
    cost, interval and share, and the table for docs/divergence-guard.md."""
    script = Path(__file__).parents[1] / "benchmarks" / "guard_snapshot.py"
    refused = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path), "--cuda-graphs",
                              "--warmup", "2"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--cuda-graphs needs --warmup 3 or more" in refused.stderr
    # --cuda-graphs on the CPU: the plan has no graphs there, and each mode says so (on a GPU: 24 layers graphed)
    done = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path), "--finetunes", "lora",
                           "--seq", "32", "--steps", "3", "--warmup", "3", "--repeats", "1", "--cuda-graphs"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "guard_snapshot.json").read_text())
    row = results["rows"][0]
    assert results["versions"]["cuda_graphs"] and all(m["graphs"]["layers"] == 0 for m in row["modes"].values())
    assert set(row["modes"]) == {"off", "guard", "every"} and "guard" not in row["modes"]["off"]
    for mode in row["modes"].values():
        assert mode["min_ms"] <= mode["median_ms"] <= mode["max_ms"] and len(mode["run_medians_ms"]) == 1
    stats = row["modes"]["guard"]["guard"]
    assert stats["snapshot_bytes"] > 0 and stats["snapshot_ms"] > 0 and stats["interval"] >= 1
    assert stats["cost_share"] is not None and row["modes"]["every"]["restore_ms"] > 0
    plan = this_machines_cpu_plan()  # bf16 with native BF16, else fp32: CI runs on either kind of CPU
    assert row["modes"]["off"]["plan"] == plan and f"| lora ({plan}) |" in done.stdout


def test_the_true_loss_under_a_loss_scaler_is_read_without_a_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning divides the loss by the accumulation count and an FP16 scaler multiplies it by its scale before
    backward: the guard undoes both, dividing by the scaler's scale tensor (``get_scale()`` is an ``.item()``, a
    sync per micro-batch on CUDA)."""
    from types import SimpleNamespace

    from lightning_te_moe.guard.decisions import DecisionLog
    from lightning_te_moe.policy.choose import PrecisionRequest, make_plan
    from lightning_te_moe.policy.environment import Environment
    from lightning_te_moe.policy.state import PrecisionState

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = DivergenceGuard(PrecisionState(make_plan(Environment(), PrecisionRequest())), DecisionLog(),
                            grads_may_overflow=lambda: True, scaler=scaler)
    seen = scaler.scale(torch.tensor(0.75) / 4)  # creates the scale tensor, as Lightning's pre_backward does
    monkeypatch.setattr(scaler, "get_scale", lambda: pytest.fail("the guard read the scale on the host"))
    guard.on_before_backward(SimpleNamespace(accumulate_grad_batches=4), SimpleNamespace(automatic_optimization=True),
                             seen)
    assert guard._loss_sum.item() == pytest.approx(0.75) and guard._loss_count == 1
