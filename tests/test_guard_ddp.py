"""DDP on CPU with 2 processes (gloo): a NaN loss on one rank costs both ranks the same step(s), at the same step,
and the ranks stay identical."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_ddp(tmp_path: Path, *args: str) -> list[dict]:
    script = Path(__file__).with_name("guard_ddp_script.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize(("reads", "expected", "lost"), [
    # values on the host: the NaN is seen before the update, which both ranks skip (their gradients are averaged)
    ("host", [["plan", 0, "", "bf16"], ["skip", 31, "step 31", "skipped"]], [1]),
    # read a step late with no device-side skip (CUDA with a non-fused optimizer): seen at the end of step 32, both
    # ranks roll back to the verified copy of step 29 (3 steps)
    ("late", [["plan", 0, "", "bf16"], ["rollback", 32, "step 32", "step 29"]], [3]),
])
def test_nan_on_one_rank_costs_both_ranks_the_same_steps(tmp_path: Path, reads: str, expected: list,
                                                         lost: list) -> None:
    ranks = run_ddp(tmp_path, "cpu", reads)
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == expected
    assert ranks[0]["steps_lost"] == ranks[1]["steps_lost"] == lost
    assert ranks[0]["rung"] == ranks[1]["rung"] == 0
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 60
    assert ranks[0]["finite"] and ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["planned_sharded"] is ranks[1]["planned_sharded"] is False  # DDP replicates the parameters


@pytest.mark.slow
def test_ranks_with_different_snapshot_costs_agree_on_the_interval_and_snapshot_at_the_same_steps(
        tmp_path: Path) -> None:
    """The adaptive interval, with rank 1 measuring its snapshots 4 times slower than rank 0: both take the
    largest proposal at the same check steps (and no snapshot at every warm-up step), so a rollback would restore
    the same step on both."""
    ranks = run_ddp(tmp_path, "cpu", "host", "plain", "adaptive")
    assert ranks[0]["captures"] == ranks[1]["captures"] and ranks[0]["intervals"] == ranks[1]["intervals"]
    assert ranks[0]["captures"][:2] == [0, 1] and 2 not in ranks[0]["captures"] and 3 not in ranks[0]["captures"]
    assert len(ranks[0]["captures"]) > 2  # and the same steps at the agreed interval
    assert ranks[0]["intervals"] and min(ranks[0]["intervals"]) > 1  # rank 1's proposal, on rank 0 too
    assert set(ranks[0]["intervals"]) == {5}  # rank 1's 5 steps against rank 0's 2 (guard_ddp_script.STEP_MS)
    later = ranks[0]["captures"][2:]
    assert all(b - a == 5 for a, b in zip(later, later[1:])), ranks[0]["captures"]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] and ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.slow
def test_a_rank_whose_host_cannot_hold_the_copies_makes_every_rank_keep_none(tmp_path: Path) -> None:
    """Rank 1's host has 1 KiB available, less than the copies need, rank 0's plenty: both ranks decide alike (no
    host copy, as no checkpoint is configured), and the NaN of step 31 is still skipped on both (seen before the
    update), with the same weights."""
    ranks = run_ddp(tmp_path, "cpu", "host", "plain", "tight-host-rank1")
    assert ranks[0]["host_budget"] == ranks[1]["host_budget"] == [[0, "none"]]
    assert ranks[0]["captures"] == ranks[1]["captures"] == []
    skip = [["plan", 0, "", "bf16"], ["skip", 31, "step 31", "skipped"]]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == skip
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 60
    assert ranks[0]["finite"] and ranks[0]["params"] == ranks[1]["params"]
