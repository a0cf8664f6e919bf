"""Run by tests/test_experts_ddp.py: 2-process CPU DDP (gloo) fit of a tiny GPT-OSS with the expert swap.

Each rank writes its swapped expert parameters (after training) to ``<out>/experts_rank<N>.json``.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_experts_fit import TinyGptOss, _loader  # noqa: E402

from lightning_te_moe import TEMoEPrecision  # noqa: E402
from lightning_te_moe.experts import GroupedExperts  # noqa: E402


def main(out: Path) -> None:
    plugin = TEMoEPrecision(print_plan=False)
    trainer = Trainer(max_steps=3, plugins=[plugin], accelerator="cpu", devices=2, strategy="ddp",
                      default_root_dir=out, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    model = TinyGptOss()
    trainer.fit(model, _loader())
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    ddp_params = {id(p) for p in trainer.strategy.model.parameters()}
    (out / f"experts_rank{trainer.global_rank}.json").write_text(json.dumps({
        "swapped": len(experts),
        "in_ddp": all(id(p) in ddp_params for m in experts for p in m.parameters()),
        "params": torch.cat([p.detach().flatten() for m in experts for p in m.parameters()]).tolist(),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # gloo's threads joined before exit: without it one rank aborted
        torch.distributed.destroy_process_group()  # at exit once ("terminate called without an active exception")
