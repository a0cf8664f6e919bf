"""DDP on CPU with 2 processes: a NaN seen on one rank makes both ranks roll back and step down at the same step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_divergence_on_one_rank_steps_both_down_at_the_same_step(tmp_path: Path) -> None:
    script = Path(__file__).with_name("guard_ddp_script.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = [["plan", 0, "", "bf16"], ["rollback", 31, "step 31", "step 0"], ["step_down", 31, "bf16", "fp32"]]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == expected
    assert ranks[0]["rung"] == ranks[1]["rung"] == 1
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 60
    assert ranks[0]["finite"] and ranks[0]["params"] == ranks[1]["params"]
