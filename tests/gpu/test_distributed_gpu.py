"""2 GPUs: the plugin under FSDPStrategy (each GroupedExperts module its own FSDP unit) and ModelParallelStrategy
(FSDP2 via shard_model), with TE recipes; a NaN on one rank gives both ranks the same decisions at the same step, the
plan carries the distributed rules, the weights stay finite, and the experts keep no quantized weights between calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _run(tmp_path: Path, kind: str, recipe: str) -> list[dict]:
    script = Path(__file__).parents[1] / "distributed_gpu_script.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), kind, recipe], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("kind", ["fsdp", "fsdp2"])
@pytest.mark.parametrize("recipe", ["bf16", "fp8_current", "fp8_delayed"])
def test_sharded_fit_with_a_nan_on_one_rank(tmp_path: Path, kind: str, recipe: str) -> None:
    ranks = _run(tmp_path, kind, recipe)
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert any(d[0] in ("skip", "rollback", "step_down") for d in ranks[0]["decisions"])
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    for rank in ranks:
        assert rank["finite"] and rank["experts"] == 2
        assert rank["te_norms"] == 5  # GPT-OSS's norms on TE's kernels, swapped before sharding
        assert (rank["fsdp_units"] if kind == "fsdp" else rank["fsdp2_units"]) == 2
        if recipe != "bf16":
            assert "fp8-sharded-params" in rank["rules"]
        assert ("fp8-delayed-amax-reduction" in rank["rules"]) == (recipe == "fp8_delayed")
        # sharded: the experts' engines ran and keep no quantized weight between calls (each a whole gathered weight)
        assert not rank["cache_enabled"] and rank["kept_quantized"] == 0
        assert rank["engines"] > 0 or recipe == "bf16"  # FP8 experts run on TE's engines (BF16 may take grouped_mm)
