"""Run by tests/test_guard_snapshot.py: 2 processes on gloo, a parameter sharded in two as a DTensor (FSDP2's
layout); each rank snapshots, corrupts and restores its own half. Writes ``OUT_DIR/rank<N>.json``."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_te_moe.guard.snapshot import SnapshotStore


def worker(rank: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("SHARD_TEST_PORT", "29517"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(distribute_tensor(torch.randn(16, 16), mesh, [Shard(0)]))
        optimizer = torch.optim.AdamW([module.weight], lr=1e-2, foreach=False)
        for _ in range(2):
            optimizer.zero_grad()
            (module.weight * module.weight).sum().backward()
            optimizer.step()
        local = module.weight.to_local()
        state = optimizer.state[module.weight]
        local_state_bytes = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local")
                                else t.numel() * t.element_size() for t in state.values())
        store = SnapshotStore()
        store.capture(2, module, [optimizer], [], None, verified=True)
        expected, pointer = local.clone(), local.data_ptr()
        with torch.no_grad():
            local.mul_(float("nan"))
        store.restore(module, [optimizer], [], None)
        restored = module.weight.to_local()
        (out / f"rank{rank}.json").write_text(json.dumps({
            "local_shape": list(restored.shape), "snapshot_bytes": store.good.nbytes,
            "local_state_bytes": local.numel() * local.element_size() + local_state_bytes,
            "restored": bool(torch.equal(restored, expected)), "same_storage": restored.data_ptr() == pointer,
            "local_sum": float(restored.sum()),
        }))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(worker, args=(Path(sys.argv[1]),), nprocs=2)
