"""Whether the guard's host copies fit the host: estimated before the first one is taken.

The guard keeps two host copies of what training changes (:mod:`.snapshot`), on every rank. At GPT-OSS-20B's size on 4
GPUs that is 2 x 32 GiB a rank (pinned buffers round up to a power of two), 256 GiB of a 504 GiB host (4 x H200,
2026-11-28), before a checkpoint's save copies every rank's shards to the host once more: on a host with half that
memory the OOM killer would end the run, and nothing would be saved. So the copies of all ranks on a host may take
at most ``GuardConfig.host_memory_budget`` of the memory the host has available when training starts.

The estimate is made before the optimizer has state (a fresh run creates it in its first step): a parameter without
state is counted with the state tensors its optimizer keeps (:data:`STATE_TENSORS`; unknown optimizers as Adam's two).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .snapshot import live_tensors, local_tensor, needs_pinning

#: State tensors per parameter, each the parameter's size, of torch's optimizers (torch/optim/*.py, ``_init_group``);
#: the scalar ``step`` tensors are left out. SGD keeps a momentum buffer only with ``momentum > 0``, Adam and AdamW
#: a third tensor with ``amsgrad``, RMSprop one more tensor per option it has on.
STATE_TENSORS: dict[str, int] = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adagrad": 1,
                                 "Adadelta": 2, "Rprop": 2, "ASGD": 1}
UNKNOWN_STATE_TENSORS = 2

MEMINFO = Path("/proc/meminfo")


def read_meminfo(meminfo: Path = MEMINFO) -> dict[str, int]:
    """The host's memory counters in bytes (Linux ``/proc/meminfo``: ``MemAvailable``, ``Shmem``, ...), or nothing
    where it cannot be read."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields = value.split()
        if fields and fields[0].isdigit():
            out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def available_host_bytes(meminfo: Path = MEMINFO) -> Optional[int]:
    """The host memory available to new allocations (Linux ``MemAvailable``), or None where it cannot be read."""
    return read_meminfo(meminfo).get("MemAvailable")


def _state_tensors(optimizer: Any, group: dict[str, Any]) -> int:
    name = type(optimizer).__name__
    if name == "SGD":
        return 1 if group.get("momentum", 0) else 0
    if name == "RMSprop":
        return 1 + bool(group.get("momentum", 0)) + bool(group.get("centered", False))
    if name in ("Adam", "AdamW") and group.get("amsgrad", False):
        return 3
    return STATE_TENSORS.get(name, UNKNOWN_STATE_TENSORS)


def snapshot_bytes(module: torch.nn.Module, optimizers: list[Any]) -> int:
    """The bytes a host copy of the state would hold now (:func:`.snapshot.live_tensors`), plus, for each parameter
    its optimizer has no state for yet, the state tensors it will get."""
    total = sum(t.numel() * t.element_size() for _, t, _ in live_tensors(module, optimizers, None))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not optimizer.state.get(param):
                    shard = local_tensor(param.detach())
                    total += _state_tensors(optimizer, group) * shard.numel() * shard.element_size()
    return total


def pinned_size(nbytes: int) -> int:
    """What torch's pinned host allocator takes for ``nbytes``: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


@dataclass(frozen=True)
class HostBudget:
    """The guard's two host copies on this host against the share of its available memory they may take."""

    copies_bytes: int  # both copies of every rank on this host
    available_bytes: int
    budget: float
    ranks_on_host: int

    @property
    def fits(self) -> bool:
        return self.copies_bytes <= self.budget * self.available_bytes

    def describe(self) -> str:
        return (f"the guard's two host copies would take {self.copies_bytes / 2**30:.1f} GiB"
                f" ({self.ranks_on_host} rank(s) on this host) of the {self.available_bytes / 2**30:.1f} GiB it has"
                f" available, more than host_memory_budget={self.budget:g} of it")

    def evidence(self) -> dict[str, Any]:
        return {"copies_gib": round(self.copies_bytes / 2**30, 2),
                "available_gib": round(self.available_bytes / 2**30, 2),
                "host_memory_budget": self.budget, "ranks_on_host": self.ranks_on_host}


def host_budget(module: torch.nn.Module, optimizers: list[Any], budget: float, ranks_on_host: int,
                available: Optional[int] = None) -> Optional[HostBudget]:
    """This host's budget check for the guard's copies, or None where the host's available memory is unknown."""
    available = available_host_bytes() if available is None else available
    if available is None:
        return None
    one = snapshot_bytes(module, optimizers)
    pinned = needs_pinning([(key, t) for key, t, _ in live_tensors(module, optimizers, None)])
    per_copy = pinned_size(one) if pinned else one
    return HostBudget(2 * per_copy * ranks_on_host, available, budget, ranks_on_host)
