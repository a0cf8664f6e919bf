"""The full-model benchmark (``benchmarks/full_model.py``) without a GPU: its targets, rendering, merging of results
from several calls, the child processes' commands and results, and its command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import full_model as fm  # noqa: E402
from full_model_targets import check_targets  # noqa: E402

FT = "frozen-experts-lora-attn"
H100 = "NVIDIA H100 80GB HBM3"


def _ok(row: str, shape: str, ms: float, peak: float, busy: float = 0.9, finetune: str = FT, stack: str = "13.1",
        device: str = H100) -> dict[str, Any]:
    batch, seq = fm.parse_shape(shape)
    return {"stack": stack, "row": row, "name": fm.BY_KEY[row].name, "finetune": finetune, "shape": shape,
            "batch": batch, "seq": seq, "layers": 24, "steps": 5, "warmup": 2, "device": device, "status": "ok",
            "median_ms": ms, "min_ms": ms - 1, "max_ms": ms + 2, "tokens_per_s": batch * seq / ms * 1e3,
            "host_ms": ms / 2, "peak_gib": peak, "setup_gib": 40.1, "gpu_busy": busy, "kernel_ms": ms * busy,
            "launches": 3100, "first_loss": 12.4, "last_loss": 12.1, "finite": True}


def _failed(row: str, shape: str, status: str, error: str = "OutOfMemoryError: CUDA out of memory.",
            finetune: str = FT, stack: str = "13.1") -> dict[str, Any]:
    batch, seq = fm.parse_shape(shape)
    return {"stack": stack, "row": row, "name": fm.BY_KEY[row].name, "finetune": finetune, "shape": shape,
            "batch": batch, "seq": seq, "layers": 24, "steps": 5, "warmup": 2, "device": H100, "status": status,
            "error": error}


def _run() -> list[dict[str, Any]]:
    """The reference runs out of memory at 4,096; the default plan runs everywhere, faster at 1,024 only."""
    return [
        _ok("flex", "1x1024", 179.0, 53.8), _ok("flex", "1x2048", 250.0, 58.0), _failed("flex", "1x4096", "oom"),
        _ok("flex", "8x1024", 900.0, 70.0),
        _ok("plugin-default", "1x1024", 110.0, 50.0, busy=0.91), _ok("plugin-default", "1x2048", 130.0, 54.0),
        _ok("plugin-default", "1x4096", 260.0, 66.0, busy=0.80), _ok("plugin-default", "8x1024", 480.0, 72.5),
    ]


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {t.target.split(": ", 1)[1]: t for t in check_targets(rows)}


def test_targets_met_and_missed_with_the_margin() -> None:
    got = _targets(_run())
    assert got["the default plan fits at every shape"].met is True
    fast = got["default plan >= 1.5x the reference at 1 x 1,024"]
    assert fast.status() == "met (+0.13x)" and "110.0 vs 179.0 ms: 1.63x" in fast.measured
    assert got["default plan >= 2x the reference at 1 x 2,048"].status() == "missed (-0.08x)"
    long = got["default plan runs at 1 x 4,096 where the reference does not"]
    assert long.met is True and "reference out of memory" in long.measured
    busy = got["GPU busy >= 85% (default plan, every shape it ran)"]
    assert busy.status() == "missed (-5.0 points)" and "lowest 80% at 1 x 4,096" in busy.measured
    memory = got["peak memory of the default plan <= the reference's (shapes where both ran)"]
    assert memory.status() == "missed (-2.5 GiB)"
    assert memory.measured == "worst at 8 x 1,024: 72.5 vs reference 70.0 GiB"


def test_an_out_of_memory_default_plan_misses_fit_and_speed() -> None:
    rows = _run()
    rows[4] = _failed("plugin-default", "1x1024", "oom")
    rows[7] = _failed("plugin-default", "8x1024", "error", "AttributeError: 'GroupedExperts' has no 'down_proj'")
    got = _targets(rows)
    fits = got["the default plan fits at every shape"]
    assert fits.met is False and fits.measured == ("1 x 1,024: out of memory; 8 x 1,024: failed (AttributeError: "
                                                   "'GroupedExperts' has no 'down_proj')")
    speed = got["default plan >= 1.5x the reference at 1 x 1,024"]
    assert speed.met is False and speed.measured == "default plan out of memory"
    # Peak memory is compared only where both ran: 1 x 2,048 is then the worst, and inside the bound.
    assert got["peak memory of the default plan <= the reference's (shapes where both ran)"].status() == "met (+4.0 GiB)"


def test_missing_rows_are_not_measured_and_a_reference_that_fits_is_said() -> None:
    only_reference = [_ok("flex", s, 200.0, 50.0) for s in fm.SHAPES]
    assert {t.status() for t in check_targets(only_reference)} == {"not measured"}
    rows = [*only_reference, _ok("plugin-default", "1x4096", 150.0, 45.0), _ok("plugin-default", "1x1024", 100.0, 45.0)]
    got = _targets(rows)
    long = got["default plan runs at 1 x 4,096 where the reference does not"]
    assert long.met is True and long.measured.startswith("both run (the reference fits too)")
    fits = got["the default plan fits at every shape"]
    assert fits.met is None and fits.measured == "ran at 1 x 1,024, 1 x 4,096; 1 x 2,048, 8 x 1,024 not measured"


def test_rows_from_different_gpus_are_not_compared() -> None:
    rows = [_ok("flex", "1x1024", 179.0, 53.8), _ok("plugin-default", "1x1024", 100.0, 50.0, device="NVIDIA H200")]
    got = _targets(rows)
    assert got["default plan >= 1.5x the reference at 1 x 1,024"].met is None
    assert "different GPUs" in got["default plan >= 1.5x the reference at 1 x 1,024"].measured
    assert fm.annotated(_results(rows))["results"][1]["vs_reference"] is None


def test_every_finetune_gets_its_own_targets() -> None:
    rows = [*_run(), *(dict(r, finetune="lora-attn-experts") for r in _run())]
    names = [t.target for t in check_targets(rows)]
    assert len(names) == 12 and names[0].startswith("frozen-experts-lora-attn: ")
    assert names[6].startswith("lora-attn-experts: ")


def _results(rows: list[dict[str, Any]], stack: str = "13.1", env: dict[str, str] | None = None) -> dict[str, Any]:
    env = env if env is not None else {"device": H100, "cublaslt": "13.1.0", "te": "2.20.2", "date": "2026-11-28"}
    return {"stacks": {stack: fm.stack_entry(24, env)}, "results": rows}


def test_render_shows_times_speedups_failures_plans_and_targets() -> None:
    rows = [*_run(), _failed("eager", "1x4096", "oom"), _failed("plugin-bf16", "1x1024", "error", "RuntimeError: x")]
    rows[4]["plan"] = "fp8_current -> bf16"
    text = fm.render(_results(rows), "13.1")
    lines = text.splitlines()
    assert lines[0] == "<!-- full_model[13.1]:begin -->" and lines[-1] == "<!-- full_model[13.1]:end -->"
    assert "cuBLASLt 13.1.0" in text and "TE 2.20.2" in text
    assert ("| plugin default plan | 1 x 1,024 | 110.0 ms (109.0-112.0) | 9,309 | 1.63x | 50.0 GiB | 40.1 GiB | 91% | "
            "55 ms | 3,100 | 12.400 -> 12.100 |") in lines
    dashes = " - | - | - | - | - | - | - | - |"
    assert f"| transformers grouped_mm + flex attention | 1 x 4,096 | out of memory |{dashes}" in lines
    assert f"| plugin bf16 | 1 x 1,024 | failed (RuntimeError: x) |{dashes}" in lines
    assert fm._row_line(dict(rows[-1], setup_gib=41.0)) == (
        "| plugin bf16 | 1 x 1,024 | failed (RuntimeError: x) | - | - | - | 41.0 GiB | - | - | - | - |")
    assert f"- plugin default plan, `{FT}`: plan `fp8_current -> bf16`" in lines
    assert f"| {FT}: default plan >= 2x the reference at 1 x 2,048 | 130.0 vs 250.0 ms: 1.92x | missed (-0.08x) |" in (
        lines)
    assert "Warning" not in text


def test_two_stacks_sit_side_by_side_in_the_doc(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nintro\n")
    split = _results(_run())
    native = _results([dict(r, stack="13.10") for r in _run()], "13.10", {"device": H100, "cublaslt": "13.10.0"})
    both = fm.merge(split, native)
    fm.write_docs(both, doc)
    first = doc.read_text()
    assert first.count("## Full GPT-OSS-20B fine-tuning, 13.1 ") == 1 and "cuBLASLt 13.10.0" in first
    again = fm.merge(both, {"stacks": {"13.10": fm.stack_entry(24, {"device": H100, "cublaslt": "13.10.0"})},
                            "results": [_ok("flex", "1x1024", 150.0, 53.0, stack="13.10")]})
    fm.write_docs(again, doc)
    text = doc.read_text()
    assert text.startswith("# Performance\n\nintro\n") and text.count("<!-- full_model[13.10]:begin -->") == 1
    assert "| transformers grouped_mm + flex attention | 1 x 1,024 | 150.0 ms" in text
    assert text.split("<!-- full_model[13.10]:begin -->")[0] == first.split("<!-- full_model[13.10]:begin -->")[0]


def test_appended_calls_replace_their_rows_and_keep_the_rest() -> None:
    first = _results(_run())
    later = _results([_ok("flex", "1x1024", 170.0, 53.0), _ok("plugin-bf16", "1x1024", 120.0, 48.0)])
    merged = fm.merge(first, later)
    cells = {(r["row"], r["shape"]): r for r in merged["results"]}
    assert len(merged["results"]) == 9 and cells[("flex", "1x1024")]["median_ms"] == 170.0
    assert cells[("plugin-default", "8x1024")]["median_ms"] == 480.0
    order = [(r["row"], r["shape"]) for r in merged["results"]]
    assert order[:4] == [("flex", s) for s in fm.SHAPES] and order[-1] == ("plugin-bf16", "1x1024")
    assert merged["stacks"]["13.1"]["conflicts"] == []


def test_a_label_reused_on_another_stack_is_flagged_and_a_depth_change_refused() -> None:
    first = _results(_run())
    other = _results([], env={"device": H100, "cublaslt": "13.10.0", "te": "2.20.2", "date": "2026-11-29"})
    merged = fm.merge(first, other)
    assert merged["stacks"]["13.1"]["conflicts"] == ["cublaslt: 13.1.0 (2026-11-28) vs 13.10.0 (2026-11-29)"]
    assert "**Warning:** calls under this label ran on differing stacks: cublaslt: 13.1.0" in fm.render(merged, "13.1")
    assert fm.merge(first, _results([], env={}))["stacks"]["13.1"]["conflicts"] == []  # a child that left no env
    smoke = {"stacks": {"13.1": fm.stack_entry(2, {})}, "results": []}
    with pytest.raises(ValueError, match="holds 24-layer results, these are 2-layer: use another --stack-label"):
        fm.merge(first, smoke)


def test_saved_results_round_trip_with_speedups_and_targets(tmp_path: Path) -> None:
    fm.save(_results(_run()), tmp_path)
    data = json.loads((tmp_path / "full_model.json").read_text())
    ref, ours = data["results"][0], data["results"][4]
    assert ref["vs_reference"] == 1.0 and abs(ours["vs_reference"] - 179 / 110) < 1e-12
    assert data["targets"]["13.1"][0]["status"] == "met"
    assert fm.load(tmp_path / "full_model.json") == _results(_run())
    assert (tmp_path / "full_model.md").read_text().startswith("<!-- full_model[13.1]:begin -->")


def _args(**overrides: Any) -> argparse.Namespace:
    args = fm.parser().parse_args(["--stack-label", "13.1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_child_command_and_environment() -> None:
    args = _args(shapes=["1x1024", "8x1024"], steps=3, warmup=1, layers=2)
    cmd = fm.child_command("plugin-default", FT, args, Path("/tmp/r.jsonl"))
    assert cmd == [sys.executable, str(BENCH / "full_model.py"), "--child", "plugin-default", FT, "--shapes", "1x1024",
                   "8x1024", "--steps", "3", "--warmup", "1", "--layers", "2", "--result-file", "/tmp/r.jsonl"]
    child = fm.parser().parse_args(cmd[2:])
    assert child.child == ["plugin-default", FT] and child.shapes == ["1x1024", "8x1024"] and child.layers == 2
    capped = fm.child_command("plugin-default", FT, _args(shapes=["1x1024"], memory_cap_gib=78.5), Path("/r"))
    assert capped[-2:] == ["--memory-cap-gib", "78.5"] and fm.parser().parse_args(capped[2:]).memory_cap_gib == 78.5
    rows = [dict(r, device="NVIDIA H200") for r in _run()]
    text = fm.render(_results(rows, env={"device": "NVIDIA H200", "memory_cap_gib": "78.5"}), "13.1")
    assert "GPU memory capped at 78.5 GiB a process" in text and "capped" not in fm.render(_results(_run()), "13.1")
    env = fm.child_env({"PYTHONPATH": "/tmp/site", "HOME": "/root"})
    assert env["PYTHONPATH"] == f"{BENCH.parent}{os.pathsep}/tmp/site" and env["HOME"] == "/root"
    assert env["PYTHONUNBUFFERED"] == "1" and fm.child_env({})["PYTHONPATH"] == str(BENCH.parent)


def test_child_lines_become_one_row_per_shape() -> None:
    args = _args(shapes=["1x1024", "1x4096", "8x1024"])
    setup = {"kind": "setup", "device": H100, "setup_gib": 40.0, "plan": "fp8_current -> bf16", "trainable": 7}
    lines = [setup, {"kind": "shape", **{k: v for k, v in _ok("plugin-default", "1x1024", 100.0, 50.0).items()
                                        if k in ("shape", "status", "median_ms", "peak_gib")}},
             {"kind": "shape", "shape": "1x4096", "status": "oom", "error": "OutOfMemoryError: CUDA out of memory."}]
    rows, env = fm.collect(lines, fm.BY_KEY["plugin-default"], FT, args, "the child timed out after 300 s")
    assert [r["status"] for r in rows] == ["ok", "oom", "error"] and env == {}
    assert rows[0]["plan"] == "fp8_current -> bf16" and rows[0]["median_ms"] == 100.0 and rows[0]["stack"] == "13.1"
    assert rows[1]["setup_gib"] == 40.0 and rows[2]["error"] == "not run: the child timed out after 300 s"
    assert rows[2]["batch"] == 8 and rows[2]["seq"] == 1024 and rows[2]["layers"] == 24

    failed = [{"kind": "setup_error", "device": H100, "status": "oom", "error": "OutOfMemoryError: CUDA out of"}]
    rows, _ = fm.collect(failed, fm.BY_KEY["flex"], FT, args, None)
    assert {r["status"] for r in rows} == {"oom"} and rows[0]["error"] == "at setup: OutOfMemoryError: CUDA out of"
    rows, _ = fm.collect([], fm.BY_KEY["flex"], FT, args, "the child exited with code -11")
    assert rows[0]["error"] == "not run: the child exited with code -11" and "device" not in rows[0]


def test_a_child_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake child reports one shape, starts a grandchild (as torch.compile's workers are) and hangs."""
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import json, subprocess, sys, time\n"
        "out = open(sys.argv[1], 'a')\n"
        "out.write(json.dumps({'kind': 'setup', 'device': 'gpu'}) + '\\n')\n"
        "out.write(json.dumps({'kind': 'shape', 'shape': '1x1024', 'status': 'ok', 'median_ms': 5.0}) + '\\n')\n"
        "out.write('{\"kind\": \"sha')\n"
        "out.flush()\n"
        f"open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '60']).pid))\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(fm, "child_command", lambda impl, ft, args, result: [sys.executable, "-c", script, str(result)])
    args = _args(shapes=["1x1024", "1x2048"], timeout=3)
    rows, _ = fm.spawn(fm.BY_KEY["eager"], FT, args, tmp_path)
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["error"] == "not run: the child timed out after 3 s"
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the killed sleeper is reaped by init; wait until it is gone
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived the timeout")


def test_kernel_time_counts_overlapping_kernels_once() -> None:
    events = [{"ph": "M", "name": "process_name"}, {"cat": "kernel", "ts": 0.0, "dur": 10.0},
              {"cat": "kernel", "ts": 5.0, "dur": 10.0},  # another stream, overlapping: 5 more
              {"cat": "kernel", "ts": 6.0, "dur": 2.0},  # inside both: nothing more
              {"cat": "gpu_memcpy", "ts": 20.0, "dur": 50.0}, {"cat": "cuda_runtime", "ts": 0.0, "dur": 99.0},
              {"cat": "kernel", "ts": 30.0, "dur": 5.0}]
    assert fm.kernel_time(events) == (20.0, 4)
    events[2]["name"], events[6]["name"] = "ncclDevKernel_ReduceScatter_Sum_f32", "ncclDevKernel_AllGather"
    assert fm.kernel_time(events, only=lambda name: name.startswith("nccl")) == (15.0, 2)


def test_versions_failures_and_weights() -> None:
    assert fm.cublaslt_text(131000) == "13.10.0" and fm.cublaslt_text(130100) == "13.1.0"
    assert fm.failure_status(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "oom"
    assert fm.failure_status(RuntimeError("cuBLAS: CUDA error: out of memory")) == "oom"
    assert fm.failure_status(AttributeError("'GroupedExperts' object has no attribute 'down_proj'")) == "error"
    assert fm.describe(RuntimeError("a | b\nsecond line")) == "RuntimeError: a / b"
    assert fm.describe(KeyError()) == "KeyError"
    model = torch.nn.Module()
    model.proj, model.input_layernorm = torch.nn.Linear(256, 256), torch.nn.LayerNorm(256)
    fm.fill_weights(model)
    assert torch.equal(model.input_layernorm.weight, torch.ones(256)) and not model.proj.bias.any()
    assert abs(model.proj.weight.std().item() - 0.02) < 1e-3 and not model.input_layernorm.bias.any()


def test_memory_at_a_failure_is_grouped_by_stream_and_pool() -> None:
    """An out-of-memory row says where the reserved memory sits: per stream and pool (the allocator's, or a CUDA
    graph's), reserved, allocated and the largest free block, the largest holder first."""
    gib = 2**30

    def segment(stream: int, pool: tuple[int, int], total: float, allocated: float, free: list[float]) -> dict:
        blocks = [{"size": int(f * gib), "state": "inactive"} for f in free]
        blocks.append({"size": int(allocated * gib), "state": "active_allocated"})
        return {"stream": stream, "segment_pool_id": pool, "total_size": int(total * gib),
                "allocated_size": int(allocated * gib), "blocks": blocks}

    rows = fm.memory_breakdown([segment(0, (0, 0), 40, 38, [2]), segment(7, (0, 0), 12, 0.5, [6, 5.5]),
                                segment(0, (1, 3), 20, 4, [16]), segment(0, (0, 0), 4, 4, [])])
    assert rows == [
        {"stream": 0, "pool": "allocator", "segments": 2, "reserved_gib": 44.0, "allocated_gib": 42.0,
         "largest_free_gib": 2.0},
        {"stream": 0, "pool": "graph (1, 3)", "segments": 1, "reserved_gib": 20.0, "allocated_gib": 4.0,
         "largest_free_gib": 16.0},
        {"stream": 7, "pool": "allocator", "segments": 1, "reserved_gib": 12.0, "allocated_gib": 0.5,
         "largest_free_gib": 6.0}]
    assert fm.memory_breakdown([]) == []


def test_pinning_sites_name_the_allocations_that_keep_free_memory_reserved() -> None:
    """After a failed step and ``empty_cache``, a segment still reserved with free space is held by its live blocks:
    they are summed by where they were allocated (the first two frames outside torch), the largest first; segments
    with little free space and graph pools are left out."""
    mib = 2**20

    def frames(*where: tuple[str, int, str]) -> list[dict]:
        torch_frame = {"filename": "/x/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"}
        return [torch_frame, *({"filename": f, "line": n, "name": name} for f, n, name in where)]

    resident = frames(("/w/lightning_te_moe/experts/resident.py", 70, "keep"),
                      ("/w/lightning_te_moe/experts/module.py", 231, "_gemm"))
    adam = frames(("/w/benchmarks/full_model.py", 200, "step"))

    def segment(pool: tuple[int, int], free: int, *live: tuple[int, list]) -> dict:
        blocks = [{"size": free * mib, "state": "inactive"}]
        blocks += [{"size": size * mib, "state": "active_allocated", "frames": where} for size, where in live]
        return {"segment_pool_id": pool, "blocks": blocks}

    found = fm.pinning_sites([segment((0, 0), 900, (530, resident), (2, adam)), segment((0, 0), 300, (530, resident)),
                              segment((0, 0), 10, (4096, adam)), segment((1, 2), 2000, (1, resident))])
    assert found == {"segments": 2, "free_gib": round(1200 / 1024, 2), "sites": [
        {"site": "experts/resident.py:70 keep < experts/module.py:231 _gemm", "blocks": 2,
         "gib": round(1060 / 1024, 3), "segments": 2},
        {"site": "benchmarks/full_model.py:200 step", "blocks": 1, "gib": round(2 / 1024, 3), "segments": 1}]}
    assert fm.pinning_sites([segment((0, 0), 100, (5, []))])["sites"][0]["site"] == "unknown"  # no history


def test_the_config_is_gpt_oss_20b() -> None:
    config = fm.gpt_oss_20b_config(24)
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok, config.vocab_size) == (
        24, 32, 4, 201088)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"] and config.sliding_window == 128
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["rope_theta"] == 150000.0
    assert config.router_aux_loss_coef == 0.0 and not config.tie_word_embeddings
    assert len(fm.gpt_oss_20b_config(2).layer_types) == 2


def _script(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(BENCH / "full_model.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=120)


def test_help_works_and_a_run_without_cuda_fails_clearly(tmp_path: Path) -> None:
    helped = _script("--help")
    assert helped.returncode == 0 and "--stack-label" in helped.stdout and "--child" not in helped.stdout
    ran = _script("--layers", "2", "--out", str(tmp_path))
    assert ran.returncode == 2 and "a CUDA GPU is needed to run the benchmark" in ran.stderr
    assert not list(tmp_path.iterdir())
    bad = _script("--append", str(tmp_path / "none.json"))
    assert bad.returncode == 2 and "no such results file" in bad.stderr
    assert _script("--steps", "0").returncode == 2 and _script("--shapes", "2x1024").returncode == 2
    capped = _script("--memory-cap-gib", "0")
    assert capped.returncode == 2 and "--memory-cap-gib must be more than 0" in capped.stderr
    few = _script("--rows", "flex", "plugin-default", "--warmup", "2")
    assert few.returncode == 2 and "rows plugin-default capture their CUDA graphs at step 3" in few.stderr
    assert "capture" not in _script("--rows", "flex", "plugin-default-eager", "--warmup", "2").stderr
    assert _script("--rows", "flex", "--warmup", "2").returncode == 2  # no graph row: only the missing GPU stops it
    assert "needs --warmup" not in _script("--rows", "flex", "--warmup", "2").stderr


def test_graphed_rows_say_how_many_layers_replayed() -> None:
    """The default plan's rows keep the plugin's cuda_graphs default (graphs on one GPU with TE); the ``-eager`` rows
    turn them off, and only the default plan's rows meet or miss targets."""
    from lightning_te_moe import graphs

    assert fm.GRAPH_WARMUP == graphs.WARMUP_CALLS + 1
    assert fm.BY_KEY["plugin-default"].graphed and fm.BY_KEY["plugin-default"].cuda_graphs is None
    assert not fm.BY_KEY["plugin-default-eager"].graphed and not fm.BY_KEY[fm.REFERENCE].graphed
    rows = _run()
    status = {"layers": 24, "graphed": 24, "refused": [], "eager_calls": {}, "signatures": 1}
    for row in rows[4:]:
        row["graphs"] = status
    rows[7]["graphs"] = {**status, "graphed": 20, "refused": ["a host synchronization in its forward (x)"],
                         "eager_calls": {"grad disabled": 2}}
    eager = [_ok("plugin-default-eager", "1x1024", 300.0, 45.0)]
    assert [t.status() for t in check_targets([*rows, *eager])] == [t.status() for t in check_targets(rows)]
    failed = dict(_failed("plugin-default", "1x4096", "oom", finetune="lora-attn-experts"), graphs=status)
    assert "`lora-attn-experts`, 1 x 4,096: 24" not in fm.render(_results([*rows, failed]), "13.1")  # failed: no claim
    text = fm.render(_results([*rows, *eager]), "13.1")
    assert (f"- plugin default plan, `{FT}`, 1 x 1,024: 24 of 24 decoder layers replayed as CUDA graphs"
            in text.splitlines())
    assert ("8 x 1,024: 20 of 24 decoder layers replayed as CUDA graphs; refused: a host synchronization in its "
            "forward (x); eager calls: 2 (grad disabled)") in text
    assert "| plugin default plan, CUDA graphs off | 1 x 1,024 | 300.0 ms" in text


def test_a_shape_the_memory_fallback_rescued_says_which_rungs_it_took() -> None:
    row = dict(_ok("plugin-default", "8x1024", 850.0, 58.8), memory=["cuda_graphs_off", "activation_checkpointing"])
    text = fm.render(_results([*_run()[:7], row]), "13.1")
    assert (f"- plugin default plan, `{FT}`, 8 x 1,024: out of GPU memory; the plugin's memory fallback "
            "took cuda_graphs_off, activation_checkpointing and the step ran again (timed after)") in text.splitlines()
    row["graphs"] = {"layers": 0, "graphed": 0, "refused": [], "eager_calls": {}, "signatures": 0}
    assert "0 of 0 decoder layers" not in fm.render(_results([*_run(), row]), "13.1")  # graphs removed: no claim


def test_the_plugin_step_runs_its_closure_through_the_memory_fallback() -> None:
    """The benchmark's step: the closure zeroes the gradients before its forward, so running it again after out of
    memory (as the plugin's fallback does) starts clean; the optimizer steps once."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    calls = []

    class _Model(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
            return argparse.Namespace(loss=model(input_ids.float()).square().sum())

    def run(closure: Any) -> torch.Tensor:
        calls.append(closure())
        return closure()  # again, as after an out-of-memory error

    loss = fm.training_step(_Model(), lambda: torch.enable_grad(), optimizer, run)(torch.ones(2, 4))
    assert len(calls) == 1 and torch.equal(loss, calls[0])
    single = torch.autograd.grad(model(torch.ones(2, 4)).square().sum(), model.weight)[0]
    assert torch.equal(model.weight.grad, single)  # not twice the gradient


def test_plugin_rows_on_a_gpu_without_te_are_refused(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without TE the plugin's rows would be the torch-only path under the TE plans' names: one error, before any
    row runs; the transformers rows alone still run."""
    from lightning_te_moe.experts import gemm

    monkeypatch.setattr(fm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gemm, "te_available", lambda: False)
    ran = []
    monkeypatch.setattr(fm, "run_child", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit):
        fm.main(["--rows", fm.REFERENCE, "plugin-default", "--out", "/nonexistent"])
    assert "rows plugin-default run the plugin, and Transformer Engine does not import here" in capsys.readouterr().err
    assert ran == []
    # a reference row's child, spawned as child_command spawns it (without --rows), runs
    fm.main(["--child", fm.REFERENCE, "frozen-experts-lora-attn"])
    assert len(ran) == 1
    with pytest.raises(SystemExit):
        fm.main(["--child", "plugin-default", "frozen-experts-lora-attn"])
    assert len(ran) == 1
