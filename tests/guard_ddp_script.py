"""Run by tests/test_guard_ddp.py: 2-process CPU DDP (gloo), NaN loss on rank 1 only at step 30.

Each rank writes what it decided and its final parameters to ``<out>/rank<N>.json``.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from guard_support import CpuLadderPrecision, TinyRegression  # noqa: E402


def main(out: Path) -> None:
    plugin = CpuLadderPrecision(print_plan=False)
    trainer = Trainer(max_steps=60, plugins=[plugin], accelerator="cpu", devices=2, strategy="ddp",
                      default_root_dir=out, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    model = TinyRegression(nan_at=(30,), nan_rank=1)
    trainer.fit(model)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "decisions": [[d.kind, d.step, d.from_, d.to] for d in plugin.decisions.decisions if d.kind != "swap"],
        "rung": plugin.state.index, "global_step": trainer.global_step,
        "params": params.tolist(), "finite": bool(torch.isfinite(params).all()),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
