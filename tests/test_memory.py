"""Out of memory in a training step (``lightning_te_moe/memory.py``): CUDA graphs off or recompute inside them (the
plan's ladder), then eager activation checkpointing, then the error; the step runs again on the same batch and
trains as if it had fit.

The CPU has no GPU memory to run out of: the tests raise ``torch.cuda.OutOfMemoryError`` themselves while the model is
in a state that would not fit (graphs installed, no checkpointing), in the forward or half-way through the backward.
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from experts_helpers import tiny_model
from lightning.pytorch import LightningModule, Trainer

from lightning_te_moe import TEMoEPrecision
from lightning_te_moe.graphs import dispatchers, install_cuda_graphs
from lightning_te_moe.guard.decisions import DecisionLog
from lightning_te_moe.memory import MemoryFallback

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


def _out_of_memory_once() -> Any:
    """A step's closure that runs out of memory the first time and returns ``"loss"`` after."""
    failures = iter([True])

    def closure() -> str:
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError(OOM)
        return "loss"

    return closure


@pytest.mark.parametrize("graphed_recompute", [False, True])
def test_each_out_of_memory_takes_the_next_rung_then_the_error_stands(graphed_recompute: bool) -> None:
    """The plan's ladder: graphs off, or recompute inside the graphs; then eager checkpointing (the graphs removed);
    then the error."""
    model = tiny_model("gpt_oss").train()
    install_cuda_graphs(model)
    log = DecisionLog()
    fallback = MemoryFallback(log, graphed_recompute=graphed_recompute)
    failures = iter([1, 1, 0])
    states = []

    def closure() -> str:
        states.append((len(dispatchers(model)), sum(d.recompute for d in dispatchers(model)),
                       model.is_gradient_checkpointing))
        if next(failures):
            raise torch.cuda.OutOfMemoryError(OOM)
        return "loss"

    assert fallback.run(closure, model) == "loss"
    first = "graphs_recompute" if graphed_recompute else "cuda_graphs_off"
    assert states == [(2, 0, False), (2, 2, False) if graphed_recompute else (0, 0, False), (0, 0, True)]
    assert fallback.taken == [first, "activation_checkpointing"]
    memory = [d for d in log.decisions if d.kind == "memory"]
    assert [d.to for d in memory] == fallback.taken and all(d.rule == "memory-fallback" for d in memory)
    assert memory[0].evidence["error"] == OOM and "runs again" in memory[1].reason
    if graphed_recompute:
        assert "2 graphed decoder layers recompute their forward" in memory[0].reason
        assert "CUDA graphs removed from 2 decoder layers; activation checkpointing on" in memory[1].reason
    else:
        assert "CUDA graphs removed from 2 decoder layers (their memory pools freed)" in memory[0].reason
        assert memory[1].reason.startswith("out of GPU memory at step 0: activation checkpointing on")

    def always() -> None:
        raise torch.cuda.OutOfMemoryError(OOM)

    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate 2.00 GiB"):
        fallback.run(always, model)
    assert f"not recovered: no way left to need less memory (taken: {first}, activation_checkpointing)" in (
        log.decisions[-1].reason)


def test_a_memory_decision_records_the_allocators_memory_at_the_failure_and_after_the_rung(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory a rung does not give back shows in the decision: allocated and reserved at the failure, then after the
    rung, the collection and ``empty_cache`` (the allocator stands in for a GPU's here)."""
    memory = {"allocated": 70 * 2**30, "reserved": 78 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *_: memory["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *_: memory["reserved"])

    def empty_cache() -> None:  # the failed step's tensors went, and the cache gives back what is free
        memory.update(allocated=31 * 2**30, reserved=int(44.5 * 2**30))

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    model = tiny_model("gpt_oss").train()
    install_cuda_graphs(model)
    log = DecisionLog()
    closure = _out_of_memory_once()
    assert MemoryFallback(log).run(closure, model) == "loss"
    (decision,) = [d for d in log.decisions if d.kind == "memory"]
    assert decision.evidence["at_failure"] == {"allocated_gib": 70.0, "reserved_gib": 78.0}
    assert decision.evidence["after_rung"] == {"allocated_gib": 31.0, "reserved_gib": 44.5}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: nothing to say
    with pytest.raises(torch.cuda.OutOfMemoryError):
        MemoryFallback(log, enabled=False).run(lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError(OOM)), model)
    assert log.decisions[-1].evidence == {"error": OOM, "at_failure": {}}


@pytest.mark.parametrize("trainer, reason", [
    (SimpleNamespace(world_size=2, accumulate_grad_batches=1, global_step=7), "several processes"),
    (SimpleNamespace(world_size=1, accumulate_grad_batches=4, global_step=7), "gradient accumulation"),
    (SimpleNamespace(world_size=1, accumulate_grad_batches=1, global_step=7,
                     lightning_module=SimpleNamespace(automatic_optimization=False)), "manual optimization"),
    (None, "memory_fallback=False"),
])
def test_out_of_memory_it_cannot_recover_is_raised_as_it_was(trainer: Any, reason: str) -> None:
    model = tiny_model("gpt_oss").train()
    log = DecisionLog()
    fallback = MemoryFallback(log, enabled=trainer is not None)

    def closure() -> None:
        raise torch.cuda.OutOfMemoryError(OOM)

    with pytest.raises(torch.cuda.OutOfMemoryError):
        fallback.run(closure, model, trainer)
    assert not model.is_gradient_checkpointing and fallback.taken == []
    assert log.decisions[-1].kind == "memory" and reason in log.decisions[-1].reason


class _LM(LightningModule):
    """The tiny GPT-OSS model on fixed batches; ``oom_from``: from this step on, a step without activation
    checkpointing runs out of memory half-way through its backward (after the head's gradients exist)."""

    def __init__(self, oom_from: int | None) -> None:
        super().__init__()
        self.model = tiny_model("gpt_oss").train()
        self.oom_from = oom_from
        self.failures = 0
        self.model.model.layers[0].register_full_backward_hook(self._backward_hook)

    def _backward_hook(self, *_: Any) -> None:
        if self.oom_from is not None and self.trainer.global_step >= self.oom_from and (
                not self.model.is_gradient_checkpointing):
            self.failures += 1
            raise torch.cuda.OutOfMemoryError(OOM)

    def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss)
        return loss

    def train_dataloader(self) -> Any:
        data = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(tmp_path: Path, oom_from: int | None, **trainer_args: Any) -> tuple[_LM, TEMoEPrecision]:
    torch.manual_seed(0)
    module = _LM(oom_from)
    plugin = TEMoEPrecision("fp32", print_plan=False)
    trainer = Trainer(max_steps=6, plugins=[plugin], accelerator="cpu", devices=1, default_root_dir=tmp_path,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **trainer_args)
    trainer.fit(module)
    return module, plugin


def test_a_fit_that_runs_out_of_memory_mid_backward_goes_on_and_trains_as_if_it_fit(tmp_path: Path) -> None:
    """The failed backward left gradients on the layers after the first: the step ran again from a clean slate
    (Lightning's zero_grad sits inside the closure), so the weights are exactly those of a run that never failed."""
    want, _ = _fit(tmp_path / "fits", None)
    got, plugin = _fit(tmp_path / "oom", 3)
    assert got.failures == 1 and got.model.is_gradient_checkpointing and plugin.memory.taken == [
        "activation_checkpointing"]
    memory = [d for d in plugin.decisions.decisions if d.kind == "memory"]
    assert len(memory) == 1 and memory[0].step == 3 and "activation checkpointing on for GptOssForCausalLM" in (
        memory[0].reason)
    for (name, a), b in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_with_gradient_accumulation_the_error_ends_the_run(tmp_path: Path) -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _fit(tmp_path, 1, accumulate_grad_batches=2)


def test_memory_fallback_false_is_a_checked_argument() -> None:
    assert TEMoEPrecision(memory_fallback=False).memory.enabled is False
    with pytest.raises(TypeError, match="memory_fallback must be True or False"):
        TEMoEPrecision(memory_fallback="yes")  # type: ignore[arg-type]
    assert copy.deepcopy(TEMoEPrecision()).memory.enabled


class _QuantizedStandIn:
    """TE's protocol for moving a quantized tensor's buffers (``prepare_for_saving`` / ``restore_from_saved``, TE
    2.20 ``Float8TensorStorage``): data, its transpose (here a view of the same storage) and the scale."""

    def __init__(self, data: torch.Tensor) -> None:
        self._data, self._transpose, self._scale_inv = data, data.t(), torch.full((1,), 0.5)

    def prepare_for_saving(self) -> tuple[list, "_QuantizedStandIn"]:
        tensors = [self._data, self._transpose, self._scale_inv]
        self._data = self._transpose = self._scale_inv = None
        return tensors, self

    def restore_from_saved(self, tensors: list) -> list:
        self._data, self._transpose, self._scale_inv = tensors[:3]
        return tensors[3:]


class _Grouped(_QuantizedStandIn):
    quantized_tensors: list = []  # TE's GroupedTensorStorage: prepare_for_saving drops these views for good


class _WithoutProtocol:  # a quantized tensor of a TE without prepare_for_saving / restore_from_saved
    def __init__(self) -> None:
        self._data = torch.zeros(3, dtype=torch.uint8)


def test_the_quantized_copies_of_frozen_weights_are_packed_anew_after_an_out_of_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies made in the first forward sit between that step's activations and keep their segments reserved. After
    a rung they go to the host (every one before the cache is emptied) and come back in new memory: the same values,
    views still views of their copy, a grouped tensor and one without TE's protocol left alone, the graphs reading
    the old addresses dropped; the decision says how much moved."""
    from lightning_te_moe.experts.resident import ResidentWeights
    from lightning_te_moe.graphs import graph_epoch

    class Frozen(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 6), requires_grad=False)
            self.held = ResidentWeights()
            self.copies = [_QuantizedStandIn(torch.arange(24, dtype=torch.uint8).view(4, 6)),
                           _Grouped(torch.ones(2, 3, dtype=torch.uint8)), _WithoutProtocol()]
            self.held.keep(self.weight, object(), self.copies, torch.device("cpu"))

        def resident_weights(self) -> list[ResidentWeights]:
            return [self.held]

    model = torch.nn.Sequential(Frozen(), torch.nn.Linear(2, 2))
    copy, grouped, plain = model[0].copies
    before = copy._data.untyped_storage().data_ptr()
    left = [t._data.untyped_storage().data_ptr() for t in (grouped, plain)]
    parked: list[int] = []

    def collect() -> int:  # between the two moves: every copy is on the host
        parked.append(copy._data.untyped_storage().data_ptr())
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    epoch = graph_epoch()
    log = DecisionLog()
    closure = _out_of_memory_once()
    model[0].supports_gradient_checkpointing = True  # the rung taken: checkpointing (no graphs here)
    model[0].gradient_checkpointing_enable = lambda **_: setattr(model[0], "is_gradient_checkpointing", True)
    assert MemoryFallback(log).run(closure, model) == "loss"

    after = copy._data.untyped_storage().data_ptr()
    assert len(parked) == 1 and len({before, parked[0], after}) == 3
    assert torch.equal(copy._data, torch.arange(24, dtype=torch.uint8).view(4, 6))
    assert copy._transpose.untyped_storage().data_ptr() == after and torch.equal(copy._transpose, copy._data.t())
    assert copy._scale_inv.item() == 0.5
    assert [t._data.untyped_storage().data_ptr() for t in (grouped, plain)] == left
    assert graph_epoch() > epoch
    (decision,) = [d for d in log.decisions if d.kind == "memory"]
    assert decision.evidence["compacted_gib"] == round((24 + 4) / 2**30, 2)
    assert "the frozen weights' quantized copies packed anew (0.0 GiB)" in decision.reason
