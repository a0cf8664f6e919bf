"""Run by tests/test_guard_ddp.py (CPU, gloo) and tests/gpu/test_guard_gpu.py (2 GPUs, NCCL): 2-process DDP,
NaN loss on rank 1 only at step 31.

    python guard_ddp_script.py OUT_DIR [cpu|gpu] [host|late] [fused|plain] [every|adaptive|tight-host-rank1]

``late`` reads each step's values a step late and gives the guard no way to look before the update, as on CUDA
(on a GPU that is what happens anyway); ``fused`` uses AdamW(fused=True), which skips on the device. ``every``
snapshots after every step; ``adaptive`` lets the guard choose the interval from fixed costs, rank 1's snapshots
4 times rank 0's (the ranks must still snapshot at the same steps); ``tight-host-rank1`` gives rank 1
a host with 1 KiB available (the guard's copies do not fit it there, but do on rank 0). Each rank writes what it
decided, the steps it lost, the steps it snapshot and its final parameters to ``OUT_DIR/rank<N>.json``.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from guard_support import CpuLadderPrecision, TinyRegression  # noqa: E402

from lightning_te_moe import DivergenceGuard, GuardConfig, TEMoEPrecision  # noqa: E402
from lightning_te_moe.guard import host_budget  # noqa: E402
from lightning_te_moe.guard.cadence import SnapshotCadence  # noqa: E402


#: ``adaptive``: each step measures this, each snapshot this (4 times it on rank 1): rank 0 asks for an interval of
#: 2 steps, rank 1 for 5 (at the guard's 2% budget), and both must take 5.
STEP_MS, SNAPSHOT_MS = 10.0, 0.2


def main(out: Path, accelerator: str, reads: str, optimizer: str, cadence: str) -> None:
    if reads == "late":
        DivergenceGuard._reads_late = staticmethod(lambda device: True)
    captures: list[int] = []
    capture, measure, measure_step = DivergenceGuard._capture, SnapshotCadence.add_snapshot, SnapshotCadence.add_step

    def spy(guard, trainer, pl_module, step, verified):
        captures.append(step)
        capture(guard, trainer, pl_module, step, verified)

    def slow_on_rank_1(self, ms, nbytes):  # fixed costs: measured ones made the interval depend on the host's load
        measure(self, SNAPSHOT_MS * (4 if torch.distributed.get_rank() == 1 else 1), nbytes)

    DivergenceGuard._capture = spy
    if cadence == "adaptive":
        SnapshotCadence.add_snapshot = slow_on_rank_1
        SnapshotCadence.add_step = lambda self, ms: measure_step(self, STEP_MS)
    if cadence == "tight-host-rank1":
        host_budget.available_host_bytes = lambda: 2**10 if torch.distributed.get_rank() == 1 else 2**50
    config = GuardConfig(snapshot_every=1 if cadence == "every" else None)
    plugin = (CpuLadderPrecision(print_plan=False, guard_config=config) if accelerator == "cpu"
              else TEMoEPrecision("bf16", print_plan=False, guard_config=config))
    trainer = Trainer(max_steps=60, plugins=[plugin], accelerator=accelerator, devices=2, strategy="ddp",
                      default_root_dir=out, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    model = TinyRegression(nan_at=(30,), nan_rank=1, fused=optimizer == "fused")
    trainer.fit(model)
    params = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    decisions = [d for d in plugin.decisions.decisions if d.kind not in ("swap", "snapshot")]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "decisions": [[d.kind, d.step, d.from_, d.to] for d in decisions],
        "steps_lost": [d.evidence.get("steps_lost") for d in decisions if d.kind != "plan"],
        "rung": plugin.state.index, "global_step": trainer.global_step, "captures": captures,
        "intervals": [d.evidence["interval"] for d in plugin.decisions.decisions
                      if d.kind == "snapshot" and d.rule == "snapshot_budget"],
        "host_budget": [[d.step, d.to] for d in plugin.decisions.decisions if d.rule == "host_memory_budget"],
        "params": params.tolist(), "finite": bool(torch.isfinite(params).all()),
        "planned_sharded": plugin.state.plan.request["sharded"],
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(sys.argv[2:] + ["cpu", "host", "plain", "every"][len(sys.argv) - 2:]))
    if torch.distributed.is_initialized():  # gloo's threads joined before exit: without it one rank aborted
        torch.distributed.destroy_process_group()  # at exit once ("terminate called without an active exception")
