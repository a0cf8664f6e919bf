"""The swapped experts under DDP (2 CPU processes, gloo): swapped on both ranks before DDP wraps the model,
their plain parameters are DDP's, and the all-reduced updates keep both ranks' experts identical."""

import json
import subprocess
import sys
from pathlib import Path

from experts_helpers import tiny_model

from lightning_te_moe.experts import GroupedExperts, swap_experts


def test_swapped_experts_train_identically_on_both_ranks(tmp_path: Path) -> None:
    script = Path(__file__).with_name("experts_ddp_script.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"experts_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["swapped"] == ranks[1]["swapped"] == 2
    assert ranks[0]["in_ddp"] and ranks[1]["in_ddp"]
    assert ranks[0]["params"] == ranks[1]["params"]  # each rank saw different batches: DDP synced the grads
    initial = tiny_model("gpt_oss")
    swap_experts(initial)
    start = [v for m in initial.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
             for v in p.flatten().tolist()]
    assert len(start) == len(ranks[0]["params"]) and start != ranks[0]["params"]  # and training moved them
