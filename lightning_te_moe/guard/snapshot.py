"""A verified copy of what training changes, in host memory (or the newest checkpoint), and putting it back.

What a snapshot holds: the trainable parameters (``requires_grad``; of a DTensor, this rank's local shard),
their optimizer state (local shards too), the module's buffers, the optimizers' hyperparameters, the LR
schedulers, the RNG states (torch, the current CUDA device, Python, NumPy), the FP16 loss scaler, and TE's
delayed-scaling scales and amax histories. Frozen parameters never change and are never copied, so a LoRA
fine-tune of a 20B model copies its adapters, not its 20B weights.

Host tensors are reused from one snapshot to the next (pinned when the source is on a GPU). On CUDA the
parameters and optimizer state are copied with ``non_blocking`` on a side stream that first waits for the
training stream, and an event marks the end; the next optimizer step (the next writer of those tensors)
waits for that event on the device, so the copy overlaps the next forward and backward and the host never
waits: that wait is the only coupling between a snapshot and training. Buffers, TE's scaling state and the
loss scaler's state are copied on the training stream (forward and the optimizer step write them). Nothing
reads a device value on the host while copying (the loss scaler's scale is copied as a tensor, not read).
Everything goes back *in place*, so optimizers, DDP and FSDP keep their tensors.

A snapshot's cost (:meth:`Snapshot.cost_ms`) is the host time spent issuing it plus the side stream's copy
time, timed by events recorded on that stream after its wait for the training stream (so the step in flight
is not counted). Allocating host buffers is timed apart, as ``alloc_ms``: pinned allocation is slow (and on CUDA
an implicit synchronization), so it happens once per layout, for both copies at the first snapshot of that
layout (on a fresh run: the probe after the first step, when the optimizer has created its state), and a buffer
of an older layout is released when its snapshot is retired, pinned memory back to the OS (torch would keep it).
"""

from __future__ import annotations

import copy
import random
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

#: Where a host copy came from (kind and position); the same key finds the live tensor at restore time.
Key = tuple


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def trainable_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters that training changes, in a stable order."""
    return [p for p in module.parameters() if p.requires_grad]


def _optimizer_params(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def te_delayed_scaling(module: torch.nn.Module) -> Optional[dict[str, list[torch.Tensor]]]:
    """A TE module's delayed-scaling state while its recipe is DelayedScaling, else None.

    The only TE internals the guard touches: the scale and amax-history tensors that TE's own CUDA-graph
    capture saves with ``get_fp8_meta_tensors`` and puts back with ``reset_fp8_meta_tensors``
    (transformer_engine/pytorch/graph.py, ``save_fp8_tensors``/``restore_fp8_tensors``), duck-typed so
    that TE is never imported here.
    """
    meta = getattr(module, "fp8_meta", None)
    if not isinstance(meta, dict) or not hasattr(module, "reset_fp8_meta_tensors"):
        return None
    recipe = meta.get("recipe")
    if recipe is None or not recipe.delayed():
        return None
    return module.get_fp8_meta_tensors()


def scaler_tensors(scaler: Optional[Any]) -> dict[str, torch.Tensor]:
    """The FP16 loss scaler's scale and growth tracker, device tensors once it has scaled a loss (``_scale`` and
    ``_growth_tracker`` in torch/amp/grad_scaler.py, updated in place); empty before, or without a scaler.

    The only GradScaler internals the guard touches: its ``state_dict()`` reads both with ``.item()``, which
    waits for the device.
    """
    if scaler is None or not scaler.is_enabled():
        return {}
    tensors = {"scale": getattr(scaler, "_scale", None), "growth_tracker": getattr(scaler, "_growth_tracker", None)}
    return {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def _scaler_settings(scaler: Optional[Any]) -> Optional[dict[str, Any]]:
    """What of the loss scaler is on the host: its growth settings, or, before its first loss, its whole state
    (no device value exists yet, so ``state_dict()`` reads none)."""
    if scaler is None or not scaler.is_enabled():
        return None
    if not scaler_tensors(scaler):
        return {"state_dict": scaler.state_dict()}
    return {"growth_factor": scaler.get_growth_factor(), "backoff_factor": scaler.get_backoff_factor(),
            "growth_interval": scaler.get_growth_interval()}


def _set_scaler_settings(scaler: Any, saved: dict[str, Any]) -> None:
    if "state_dict" in saved:
        scaler.load_state_dict(saved["state_dict"])
        return
    scaler.set_growth_factor(saved["growth_factor"])
    scaler.set_backoff_factor(saved["backoff_factor"])
    scaler.set_growth_interval(saved["growth_interval"])


def needs_pinning(sources: list[tuple[Key, torch.Tensor]]) -> bool:
    """A copy from the GPU goes to pinned memory: only then can it run asynchronously on the side stream."""
    return any(t.is_cuda for _, t in sources)


def _host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """One flat host buffer for a snapshot (pinned when a source is on a GPU)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def _give_back_pinned() -> None:
    """Return the pinned blocks torch's host allocator keeps cached to the OS. A freed pinned buffer stays in that
    cache for reuse, where nothing else can use it: a fresh run's first snapshot (parameters only, before AdamW has
    state) is 2 x 16 GB a rank at GPT-OSS-20B's size on 4 GPUs, 128 GB of the host's 503 held after the layout
    changed; with the two current copies (256 GB) that matches the 377 GB of shared memory seen during the fit, and
    the checkpoint's save, which copies every rank's shards to the host once more, was killed by the OOM killer (4 x
    H200, 2026-11-28). Frees with ``cudaFreeHost``, which synchronizes: only when a copy was dropped."""
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy
    except ImportError:
        return state
    state["numpy"] = numpy.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


class Snapshot:
    """One host copy of the training state after optimizer step ``step``.

    Its tensors are views into one flat host buffer (pinned when a source is on a GPU: one allocation, and no
    rounding up of each tensor by the pinned-memory allocator), reused by the next fill of the same layout.
    """

    def __init__(self) -> None:
        self.step = -1
        self.flat: Optional[torch.Tensor] = None
        self.pinned = False
        self.layout: tuple = ()
        self.tensors: dict[Key, torch.Tensor] = {}
        self.host: dict[str, Any] = {}
        self.done: Optional[Any] = None  # CUDA event at the end of the side-stream copy
        self._timer: Optional[tuple[Any, Any]] = None
        self.host_ms = 0.0
        self.alloc_ms = 0.0
        self.reported = True

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def place(self, sources: list[tuple[Key, torch.Tensor]]) -> bool:
        """Host tensors for ``sources``: the current ones if the layout is unchanged, else a new flat buffer
        (returns True, the time spent allocating in ``alloc_ms``)."""
        self.alloc_ms = 0.0
        layout = tuple((key, tuple(t.shape), t.dtype) for key, t in sources)
        if layout == self.layout:
            return False
        offsets, total = [], 0
        for _, tensor in sources:
            offsets.append(total)
            total += -(-tensor.numel() * tensor.element_size() // 64) * 64  # 64-byte aligned views
        start = time.perf_counter()
        self.flat, self.tensors = None, {}  # the old buffer goes back to the allocator first
        self.pinned = needs_pinning(sources)
        self.flat = _host_buffer(total, pinned=self.pinned)
        self.alloc_ms = (time.perf_counter() - start) * 1e3
        self.tensors = {key: self.flat[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                        for (key, t), o in zip(sources, offsets)}
        self.layout = layout
        return True

    def cost_ms(self) -> Optional[float]:
        """Host time issuing the snapshot (allocation excluded) plus the side-stream copy's own device time, once
        the copy has finished (None before)."""
        if self._timer is None:
            return self.host_ms
        start, end = self._timer
        if not end.query():
            return None
        return self.host_ms + start.elapsed_time(end)


def live_tensors(module: torch.nn.Module, optimizers: list[Any],
                 scaler: Optional[Any]) -> Iterator[tuple[Key, torch.Tensor, bool]]:
    """Every device tensor a snapshot copies: (key, live tensor, whether only an optimizer step writes it)."""
    for i, param in enumerate(trainable_parameters(module)):
        yield ("param", i), local_tensor(param.detach()), True
    for name, buf in module.named_buffers():
        yield ("buffer", name), local_tensor(buf), False
    for o, optimizer in enumerate(optimizers):
        for i, param in enumerate(_optimizer_params(optimizer)):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    yield ("optimizer", o, i, key), local_tensor(value), True
    for name, sub in module.named_modules():
        scaling = te_delayed_scaling(sub)
        for meta_key, tensors in (scaling or {}).items():
            for j, tensor in enumerate(tensors):
                yield ("te", name, meta_key, j), tensor, False
    for name, tensor in scaler_tensors(scaler).items():
        yield ("scaler", name), tensor, False


class SnapshotStore:
    """The last verified snapshot (``good``) and at most one ``candidate``: the state after step ``t`` is
    verified once step ``t + 1``'s values (computed from it) are read healthy. Two host copies at most, reused."""

    def __init__(self) -> None:
        self.good: Optional[Snapshot] = None
        self.candidate: Optional[Snapshot] = None
        self._spare: list[Snapshot] = []
        self._side: Optional[Any] = None
        self.alloc_ms = 0.0  # spent allocating host buffers, in all

    @property
    def latest(self) -> Optional[Snapshot]:
        return self.candidate or self.good

    @property
    def nbytes(self) -> int:
        """Host memory held by both copies."""
        copies = (self.good, self.candidate, *self._spare)
        return sum(s.flat.numel() for s in copies if s is not None and s.flat is not None)

    def capture(self, step: int, module: torch.nn.Module, optimizers: list[Any], schedulers: list[Any],
                scaler: Optional[Any], verified: bool) -> Snapshot:
        """Copy the state after ``step``: as the verified one, or as the candidate to verify later. Pinned copies
        of an older layout it drops go back to the OS."""
        with self._giving_back_dropped_pinned():
            return self._capture(step, module, optimizers, schedulers, scaler, verified)

    def _capture(self, step: int, module: torch.nn.Module, optimizers: list[Any], schedulers: list[Any],
                 scaler: Optional[Any], verified: bool) -> Snapshot:
        if verified and self.candidate is None and self.good is not None and self.good.done is None:
            slot = self.good  # copied synchronously: refill the verified copy in place (one host copy)
        else:
            slot = self._spare.pop() if self._spare else Snapshot()
        self._fill(slot, step, module, optimizers, schedulers, scaler)
        if verified:
            self._retire(self.good, keep=slot)
            self._retire(self.candidate, keep=slot)
            self.good, self.candidate = slot, None
        else:
            self._retire(self.candidate, keep=slot)
            self.candidate = slot
        return slot

    def verify(self, step: int) -> bool:
        """Step ``step``'s values were read and healthy: a candidate taken at or before it becomes the good copy."""
        if self.candidate is None or self.candidate.step > step:
            return False
        with self._giving_back_dropped_pinned():
            self._retire(self.good, keep=self.candidate)
            self.good, self.candidate = self.candidate, None
        return True

    def release(self) -> None:
        """Drop every host copy and give pinned ones back to the OS (after a fit: a 20B model's shards and AdamW state
        are tens of GB of pinned memory a rank, which a later fit in the same process would otherwise hold twice).
        The next capture allocates anew."""
        if self._side is not None:
            self._side.synchronize()  # no copy may still be writing into a buffer that goes
        with self._giving_back_dropped_pinned():
            self.good, self.candidate, self._spare = None, None, []

    def discard_candidate(self) -> None:
        with self._giving_back_dropped_pinned():
            self._retire(self.candidate, keep=self.good)
            self.candidate = None

    def wait_before_update(self) -> None:
        """Order the next optimizer step after the copy of the tensors it overwrites (on the device)."""
        latest = self.latest
        if latest is not None and latest.done is not None:
            torch.cuda.current_stream().wait_event(latest.done)

    def finished_costs(self) -> list[tuple[float, int]]:
        """(cost ms, bytes) of the snapshots whose copies finished since the last call."""
        out = []
        for slot in (self.good, self.candidate):
            if slot is not None and not slot.reported:
                cost = slot.cost_ms()
                if cost is not None:
                    slot.reported = True
                    out.append((cost, slot.nbytes))
        return out

    @contextmanager
    def _giving_back_dropped_pinned(self) -> Iterator[None]:
        """Around a change of the copies held: pinned buffers it dropped go back to the OS (torch would keep them)."""
        held = [weakref.ref(s.flat) for s in (self.good, self.candidate, *self._spare)
                if s is not None and s.flat is not None and s.pinned]
        yield
        if any(ref() is None for ref in held):
            _give_back_pinned()

    def _retire(self, slot: Optional[Snapshot], keep: Snapshot) -> None:
        """``slot`` is no longer needed: a spare for the next copy, or released if of an older layout than ``keep``."""
        if slot is not None and slot is not keep and slot not in self._spare and slot.layout == keep.layout:
            self._spare.append(slot)

    def _fill(self, slot: Snapshot, step: int, module: torch.nn.Module, optimizers: list[Any],
              schedulers: list[Any], scaler: Optional[Any]) -> None:
        start = time.perf_counter()
        sources = list(live_tensors(module, optimizers, scaler))
        placed = [(key, live) for key, live, _ in sources]
        if slot.place(placed):  # a new layout: the next copy's buffer too, now rather than in the middle of the run
            self._spare = [spare for spare in self._spare if spare.layout == slot.layout]
            if not self._spare:
                spare = Snapshot()
                spare.place(placed)
                slot.alloc_ms += spare.alloc_ms
                self._spare.append(spare)
            self.alloc_ms += slot.alloc_ms
        side_jobs, main_jobs = [], []
        for key, live, optimizer_written in sources:
            (side_jobs if optimizer_written and live.is_cuda else main_jobs).append((slot.tensors[key], live))
        slot.host = {
            "params": [(tuple(t.shape), t.dtype) for t in (local_tensor(p) for p in trainable_parameters(module))],
            "optimizer_values": [{i: {k: copy.deepcopy(v) for k, v in optimizer.state.get(p, {}).items()
                                      if not isinstance(v, torch.Tensor)}
                                  for i, p in enumerate(_optimizer_params(optimizer)) if optimizer.state.get(p)}
                                 for optimizer in optimizers],
            "param_groups": [[{k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
                              for group in optimizer.param_groups] for optimizer in optimizers],
            "schedulers": [copy.deepcopy(s.state_dict()) for s in schedulers],
            "scaler": _scaler_settings(scaler),
            "rng": _rng_state(),
        }
        for buf, live in main_jobs:
            buf.copy_(live, non_blocking=live.is_cuda)
        slot.done, slot._timer = None, None
        if side_jobs:
            if self._side is None:
                self._side = torch.cuda.Stream()
            self._side.wait_stream(torch.cuda.current_stream())
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._side):
                begin.record(self._side)  # after the wait: the step in flight is not the copy's time
                for buf, live in side_jobs:
                    buf.copy_(live, non_blocking=True)
                end.record(self._side)
            slot.done, slot._timer = end, (begin, end)
        slot.step = step
        slot.host_ms = (time.perf_counter() - start) * 1e3 - slot.alloc_ms
        slot.reported = False

    @torch.no_grad()
    def restore(self, module: torch.nn.Module, optimizers: list[Any], schedulers: list[Any],
                scaler: Optional[Any]) -> dict[str, Any]:
        """Put the good snapshot back in place; returns what was restored and what could not be."""
        slot = self.good
        assert slot is not None, "the guard snapshots at the start of training"
        if slot.done is not None:
            torch.cuda.current_stream().wait_event(slot.done)
        now = [(tuple(t.shape), t.dtype) for t in (local_tensor(p) for p in trainable_parameters(module))]
        if now != slot.host["params"]:
            raise RuntimeError("the trainable parameters changed since the guard's snapshot (a parameter was frozen,"
                               " unfrozen or resized during training): the guard cannot roll back into this model")
        live = {key: tensor for key, tensor, _ in live_tensors(module, optimizers, scaler) if key[0] != "te"}
        missing = [key for key in slot.tensors if key[0] != "te" and key not in live]
        if missing:
            raise RuntimeError(f"{missing[:3]} no longer exist since the guard's snapshot: the guard cannot roll back")
        for o, optimizer in enumerate(optimizers):
            for i, param in enumerate(_optimizer_params(optimizer)):
                if i not in slot.host["optimizer_values"][o]:
                    optimizer.state.pop(param, None)  # the snapshot predates this state: the optimizer starts it again
                else:
                    optimizer.state[param].update(copy.deepcopy(slot.host["optimizer_values"][o][i]))
            for group, saved in zip(optimizer.param_groups, slot.host["param_groups"][o]):
                for name, value in saved.items():
                    if isinstance(group.get(name), torch.Tensor) and isinstance(value, torch.Tensor):
                        group[name].copy_(value)
                    else:
                        group[name] = copy.deepcopy(value)
        te_modules: dict[str, dict[str, list[torch.Tensor]]] = {}
        for key, buf in slot.tensors.items():
            if key[0] == "te":
                te_modules.setdefault(key[1], {}).setdefault(key[2], [buf, buf])[key[3]] = buf
            else:
                live[key].copy_(buf, non_blocking=live[key].is_cuda)
        te_skipped = []
        modules = dict(module.named_modules())
        for name, saved in te_modules.items():
            current = te_delayed_scaling(modules[name]) if name in modules else None
            shapes = {k: [t.shape for t in v] for k, v in (current or {}).items()}
            if shapes != {k: [t.shape for t in v] for k, v in saved.items()}:
                te_skipped.append(name)  # the recipe changed since (a step-down): its history no longer applies
                continue
            modules[name].reset_fp8_meta_tensors(saved)
        rejoin_schedulers(schedulers, slot.host["schedulers"])
        if scaler is not None and slot.host["scaler"] is not None:
            _set_scaler_settings(scaler, slot.host["scaler"])
        _set_rng_state(slot.host["rng"])
        return {"step": slot.step, "te_modules_restored": len(te_modules) - len(te_skipped),
                "te_modules_not_restored": te_skipped}


def rejoin_schedulers(schedulers: list[Any], saved: list[dict[str, Any]]) -> None:
    """Load each LR scheduler's saved state and step it back to where it was before the rollback.

    The learning-rate schedule follows the step counter, which a rollback does not turn back (the batches
    since the snapshot are skipped, as a loss scaler skips an overflowing step), and every scheduler call
    Lightning made since the snapshot is replayed from the restored hyperparameters, so an LR that was
    changed by hand since (or blown up) is not carried over. ``ReduceLROnPlateau`` steps on validation
    metrics, which a rollback does not undo: it and its learning rates are kept.
    """
    for scheduler, state in zip(schedulers, saved):
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
            continue
        ahead = scheduler.last_epoch - state["last_epoch"]
        scheduler.load_state_dict(copy.deepcopy(state))
        for _ in range(ahead):
            scheduler.step()


def last_checkpoint(trainer: Any) -> Optional[str]:
    """The ``last.ckpt`` of the first ``ModelCheckpoint(save_last=True)``, once one was written."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "save_last", None) and callback.last_model_path:
            return callback.last_model_path
    return None


def restore_checkpoint(path: str, trainer: Any) -> int:
    """Load model, optimizer and LR-scheduler states from ``path`` through the strategy (any strategy's
    checkpoint layout); the schedulers then rejoin the current step (:func:`rejoin_schedulers`) and the
    precision plugin's state is left alone, so the current rung stays. Returns the checkpoint's step."""
    checkpoint = trainer.strategy.load_checkpoint(path)
    trainer.strategy.load_model_state_dict(checkpoint, strict=True)
    trainer.strategy.load_optimizer_state_dict(checkpoint)
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    rejoin_schedulers(schedulers, checkpoint.get("lr_schedulers", []))
    return int(checkpoint["global_step"])
