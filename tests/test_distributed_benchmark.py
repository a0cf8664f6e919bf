"""benchmarks/distributed.py: its model-FLOPs count, and its ``--tiny`` run on 2 CPU processes (gloo): every
configuration runs, the NaN on the last rank gives every rank the same decisions, the sharded checkpoint resumes (in a
process of its own), and the HF export loads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import distributed  # noqa: E402
from distributed import check_te, configurations, flops_per_token, gpt_oss_config, kernel_summary, parser  # noqa: E402


def test_flops_per_token_of_gpt_oss_20b() -> None:
    config = gpt_oss_config(tiny=False)
    # 6 x (24 layers x (attention 2880*4096*2 + 2*2880*512, router 2880*32, 4 experts x 3*2880^2) + head 2880*201088)
    params = 24 * (2 * 2880 * 4096 + 2 * 2880 * 512 + 2880 * 32 + 4 * 3 * 2880 * 2880) + 2880 * 201088
    attention = 12 * 4096 * (12 * 4096 + 12 * 128)  # 12 full layers at 4,096 tokens, 12 sliding at the 128 window
    assert flops_per_token(config, 4096) == 6 * params + attention
    assert 6 * params == pytest.approx(21.7e9, rel=0.01)  # NeMo's 279 TFLOP/s at 13,058 tokens/s: 21.4 GFLOP a token


def test_kernel_summary_splits_nccl_from_compute_per_step() -> None:
    class Profiler:  # what torch.profiler's export writes: kernels of two steps, NCCL overlapping compute
        def export_chrome_trace(self, path: str) -> None:
            kernels = [("gemm", 0, 40), ("ncclDevKernel_AllGather", 30, 30), ("gemm", 100, 40),
                       ("ncclDevKernel_ReduceScatter", 150, 20)]
            events = [{"cat": "kernel", "name": n, "ts": t, "dur": d} for n, t, d in kernels]
            Path(path).write_text(json.dumps({"traceEvents": [*events, {"cat": "cuda_runtime", "ts": 0, "dur": 500}]}))

    summary = kernel_summary(Profiler(), steps=2, wall_ms=1.0)
    # union: 0-60 and 100-140 and 150-170 = 120 us; NCCL 50 us; compute 80 us; per step, in ms
    assert summary == {"steps": 2, "kernel_ms": 0.06, "nccl_ms": 0.025, "compute_ms": 0.04, "launches": 2,
                       "nccl_launches": 1, "profiled_step_ms": 1.0, "gpu_busy": 0.06,
                       "top_kernels": [["gemm", 0.04, 1.0], ["ncclDevKernel_AllGather", 0.015, 0.5],
                                       ["ncclDevKernel_ReduceScatter", 0.01, 0.5]]}


def test_kernel_summary_of_an_empty_profile_is_an_error_not_an_idle_gpu() -> None:
    class Profiler:  # CUPTI missing: the trace holds host events only
        def export_chrome_trace(self, path: str) -> None:
            Path(path).write_text(json.dumps({"traceEvents": [{"cat": "cuda_runtime", "ts": 0, "dur": 500}]}))

    summary = kernel_summary(Profiler(), steps=2, wall_ms=1.0)
    assert "kernel_ms" not in summary and "no CUDA kernel" in summary["error"]


def test_a_gpu_without_te_is_refused_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TE every plan is the torch-only path: on a GPU that is refused, so its figures cannot pass for the TE
    plans'; ``--allow-no-te`` measures it on purpose (and reaches every configuration ``all`` starts)."""
    from lightning_te_moe.experts import gemm

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gemm, "te_available", lambda: False)
    with pytest.raises(SystemExit, match="Transformer Engine does not import on this GPU machine"):
        check_te(parser().parse_args(["run", "--out", "x"]))
    allowed = parser().parse_args(["all", "--out", "x", "--allow-no-te"])
    check_te(allowed)
    check_te(parser().parse_args(["run", "--out", "x", "--tiny"]))  # the CPU check of the script itself
    allowed.seq, allowed.steps, allowed.warmup, allowed.devices = 4096, 24, 4, 4
    assert all("--allow-no-te" in config for config in configurations(allowed))
    monkeypatch.setattr(gemm, "te_available", lambda: True)
    check_te(parser().parse_args(["run", "--out", "x"]))


@pytest.mark.slow
def test_tiny_run_of_every_configuration(tmp_path: Path) -> None:
    # In two calls, as on a GPU machine whose command time is limited: the second merges into the first's results.
    # The first call also asks for a profile of one step after the timed ones (on the CPU it says why there is none).
    for only, extra in ((["fsdp2-bf16", "ddp-1", "ddp-2"], ["--profile", "1"]), (["fsdp2-default"], [])):
        done = subprocess.run([sys.executable, str(BENCHMARKS / "distributed.py"), "all", "--tiny", "--out",
                               str(tmp_path), "--only", *only, *extra], cwd=tmp_path, capture_output=True, text=True,
                              timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        partial = json.loads((tmp_path / "distributed.json").read_text())
        assert set(only) <= set(partial["runs"])
    result = json.loads((tmp_path / "distributed.json").read_text())
    assert result["failed"] == {} and set(result["runs"]) == {"fsdp2-bf16", "fsdp2-default", "ddp-1", "ddp-2"}
    for name, run in result["runs"].items():
        profiled = name != "fsdp2-default"
        assert run["same_decisions_on_every_rank"] and run["tokens_per_s_per_gpu"] > 0
        assert run["global_step"] == 6 + profiled and run["timed_steps"] == 5  # 6 steps, 1 untimed, then the profile's
        assert run.get("profile") == ({"skipped": "not on a GPU"} if profiled else None)
        assert 0 < run["seconds"]["setup"] < run["seconds"]["fit"]
    default = result["runs"]["fsdp2-default"]
    assert ["skip", 4, "step 4", "skipped"] in default["decisions"]  # the NaN at step 3 on rank 1, on both ranks
    assert default["same_resume_on_every_rank"] and default["seconds"]["save"] > 0 and default["seconds"]["resume"] > 0
    host = default["host_memory_gib"]  # where the host's memory stood around the save (Linux)
    assert set(host) == {"after_fit", "after_save"} and 0 < host["after_fit"]["available"] <= host["after_fit"]["total"]
    assert default["guard_host_copies_gib"] > 0  # the guard held its copies until the save
    assert {k: default["resume"][k] for k in ("global_step", "plan_equal", "history_kept", "ranks_reported")} == {
        "global_step": 8, "plan_equal": True, "history_kept": True, "ranks_reported": 2}  # resumed in a new process
    assert default["export"]["loaded"] and default["export"]["experts_shape"] == default["export"][
        "expected_experts_shape"] == [8, 32, 96]
    assert result["ddp_scaling"] > 0


def test_all_passes_the_batch_and_runs_fp8_only_on_a_gpu() -> None:
    """``all --batch 2`` reaches every configuration (tokens per GPU are part of what is measured); the named-FP8
    configuration (the step-down from FP8) is left out of ``--tiny``, whose CPU runs no FP8."""
    args = parser().parse_args(["all", "--out", "x", "--batch", "2"])
    args.seq, args.steps, args.warmup, args.devices = 4096, 24, 4, 4
    configs = {c[1]: c for c in configurations(args)}
    assert list(configs) == ["fsdp2-bf16", "fsdp2-default", "fsdp2-fp8", "ddp-1", "ddp-2"]
    assert all(c[c.index("--batch") + 1] == "2" for c in configs.values())
    fp8 = configs["fsdp2-fp8"]
    assert fp8[fp8.index("--recipe") + 1] == "fp8_current" and fp8[fp8.index("--nan-at") + 1:][:2] == ["12", "13"]
    # one process would run CUDA graphs by default and two would not: the DDP scaling compares the same eager step
    ddp1 = configs["ddp-1"]
    assert ddp1[ddp1.index("--cuda-graphs") + 1] == "off" and "--cuda-graphs" not in configs["ddp-2"]
    assert parser().parse_args(["run", "--out", "x", *ddp1[:ddp1.index("--seq")]]).cuda_graphs == "off"
    tiny = parser().parse_args(["all", "--out", "x", "--tiny"])
    tiny.seq, tiny.steps, tiny.warmup, tiny.devices = 16, 6, 1, 2
    assert "fsdp2-fp8" not in {c[1] for c in configurations(tiny)}
