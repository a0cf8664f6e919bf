"""The ``lightning-te-moe`` command: ``plan`` (table, JSON, --assume-* flags, bad flags) and LightningCLI ``fit``."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

import pytest
import yaml
from cli_support import main_job_config
from cpu_kinds import this_machines_cpu_plan

from lightning_te_moe.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_plan_table_on_this_machine(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "lightning-te-moe precision plan" in out and "why" in out
    dense = next(line for line in out.splitlines() if "dense layers" in line)
    assert "cpu" in out and this_machines_cpu_plan() in dense  # CI and this machine have no GPU


def test_plan_on_each_kind_of_cpu(cpu_kind, capsys):
    native_bf16, recipe, rule = cpu_kind
    assert main(["plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dense"]["name"] == plan["experts"]["name"] == recipe and len(plan["ladder"]) == 1
    assert plan["environment"]["cpu_bf16"] is native_bf16 and plan["reasons"][0]["rule"] == rule


def test_plan_json_for_assumed_dgx_spark(capsys):
    assert main(["plan", "--assume-cc", "12.1", "--assume-te", "2.20.2", "--assume-cudnn", "9.18.1", "--auto-nvfp4",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dense"] == {"name": "nvfp4", "settings": {"disable_rht": True, "disable_stochastic_rounding": True}}
    assert plan["experts"]["name"] == "bf16"  # TE's grouped NVFP4 needs RHT; FP8 unproven on SM120 (issue 17)
    assert plan["fused_attention"] is True and plan["env_vars"] == {}
    assert plan["environment"]["compute_capability"] == [12, 1] and plan["environment"]["assumed"] is True
    assert {"sm120-nvfp4-no-rht", "sm120-order"} <= {r["rule"] for r in plan["reasons"]}


def test_plan_assumed_old_cudnn_sets_env_var(capsys):
    assert main(["plan", "--assume-cc", "12.1", "--assume-te", "2.20.2", "--assume-cudnn", "9.14.0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["env_vars"] == {"NVTE_FUSED_ATTN": "0"} and plan["fused_attention"] is False


def test_plan_assume_te_only_overrides_probed_machine(capsys):
    assert main(["plan", "--assume-te", "2.14.0", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)["environment"]
    assert env["te_version"] == "2.14.0" and env["assumed"] is True and env["device_type"] == "cpu"


def test_plan_forbidden_recipe_fails_with_allowed_list(capsys):
    assert main(["plan", "--assume-cc", "9.0", "--assume-te", "2.20.2", "--recipe", "mxfp8"]) == 1
    err = capsys.readouterr().err
    assert "hopper-fp8" in err and "Recipes allowed here: bf16, fp16, fp32, fp8_delayed, fp8_current, fp8_block" in err
    assert main(["plan", "--assume-cc", "9.0", "--assume-te", "2.20.2", "--recipe", "mxfp8", "--no-strict",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dense"]["name"] == "fp8_current"


@pytest.mark.parametrize(("argv", "message"), [
    (["plan", "--assume-cc", "9.x"], "compute capability must look like"),
    (["plan", "--assume-cc", "99.9"], "compute capability 99.9 is not one of an NVIDIA GPU; known: 5.0, 5.2,"),
    (["plan", "--assume-cc", "9.1"], "known: 5.0, 5.2, 5.3, 6.0, 6.1, 6.2, 7.0, 7.2, 7.5, 8.0, 8.6, 8.7, 8.9, 9.0,"
                                     " 10.0, 10.1, 10.3, 11.0, 12.0, 12.1 (or 'cpu')"),
    (["plan", "--assume-cc", "9.0", "--assume-te", "latest"], "not a version number"),
    (["plan", "--recipe", "fp9"], "invalid choice: 'fp9'"),
    (["plan", "--deny", "int8"], "invalid choice: 'int8'"),
    (["plan", "--frobnicate"], "unrecognized arguments"),
])
def test_plan_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def _config(tmp_path: Path, trainer: Optional[dict] = None, **plugin_args) -> Path:
    """The main job's config, tiny, writing under ``tmp_path`` (logs, checkpoints) instead of runs/."""
    defaults = dict(max_steps=4, val_check_interval=2, limit_val_batches=2, enable_progress_bar=False, logger=False)
    config = main_job_config(tmp_path, **{**defaults, **(trainer or {})})
    config["trainer"]["plugins"][0]["init_args"].update(plugin_args)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_from_yaml_with_the_plugin(tmp_path, capsys, monkeypatch):
    example = {"enable_progress_bar": None, "logger": None}  # the example's progress bar and logger
    config = _config(tmp_path, trainer={**example, "log_every_n_steps": 2}, recipe="auto", deny=["fp16"],
                     cache_quantized_weights=False)
    monkeypatch.setattr(sys, "argv", ["lightning-te-moe", "fit", "--config", str(config)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main() == 0  # as the console script calls it
    assert not [w for w in caught if "LightningCLI's args parameter" in str(w.message)]
    out = capsys.readouterr().out
    assert "lightning-te-moe precision plan" in out and re.search(r"│ experts +│", out)  # GPT-OSS: MoE experts
    # stdout is not a terminal here: plain progress lines instead of rich's bar (which would print nothing)
    assert "[progress] step 2/4  train_loss " in out and "[progress] validation at step 2: val_loss " in out
    assert "[progress] training done at step 4" in out
    # the example's logger is CSV, chosen explicitly: tensorboard is installed here and would otherwise win
    logs = tmp_path / "lightning_logs" / "version_0"
    assert all((logs / name).exists() for name in ("metrics.csv", "hparams.yaml", "precision_decisions.jsonl",
                                                   "config.yaml"))  # the README's "Where files go"
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    import torch

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    state = ckpt["TEMoEPrecision"]
    assert state["plan"]["request"]["deny"] == ["fp16"] and state["rung"] == 0


def test_fit_help_shows_the_plugin_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "The precision plugin's options are listed at the end." in out
    options = out[out.index("lightning-te-moe precision plugin options"):]
    assert "  recipe: auto | bf16 | fp16 | fp32 | fp8_delayed | fp8_current | fp8_block | mxfp8 | nvfp4" in options
    assert "  params_dtype: float32 | bfloat16 (default: float32)" in options
    assert "  guard_config: GuardConfig fields: window=100, warmup=50," in options
    assert "      recipe names the plan must not use." in options


@pytest.mark.parametrize(("args", "message"), [
    ({"recipe": "fp9"}, "trainer.plugins.recipe (lightning_te_moe.TEMoEPrecision): 'fp9' is not allowed; allowed:"
                        " auto, bf16, fp16, fp32, fp8_delayed, fp8_current, fp8_block, mxfp8, nvfp4"),
    ({"recipie": "auto"}, "trainer.plugins (lightning_te_moe.TEMoEPrecision): unknown option 'recipie' (did you mean"
                          " 'recipe'?); its options are: recipe, allow, deny, auto_nvfp4,"),
    ({"deny": ["int8"]}, "trainer.plugins.deny (lightning_te_moe.TEMoEPrecision): 'int8' is not allowed;"
                         " allowed: bf16,"),
    ({"deny": "fp8_delayed"}, "trainer.plugins.deny (lightning_te_moe.TEMoEPrecision): expected a list, got"
                              " 'fp8_delayed'"),
    ({"params_dtype": "float64"}, "trainer.plugins.params_dtype (lightning_te_moe.TEMoEPrecision): 'float64' is not"
                                  " allowed; allowed: float32, bfloat16"),
    ({"strict": "maybe"}, "trainer.plugins.strict (lightning_te_moe.TEMoEPrecision): expected a bool, got 'maybe'"),
    # refused by a constructor while the classes are built, not by the parser: still one line, no traceback
    ({"autotune_tokens": 0}, "TEMoEPrecision(autotune_tokens=0): autotune_tokens must be a positive whole number"),
])
def test_fit_yaml_with_bad_plugin_args_fails_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(_config(tmp_path, **args))])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"lightning-te-moe fit: error: {message}" or err[0].startswith(
        f"lightning-te-moe fit: error: {message}")
    assert len(err) == 2 and err[1].startswith("(lightning-te-moe fit --help lists the options")


@pytest.mark.parametrize(("trainer", "argv", "message"), [
    ({"max_step": 3}, [], "Subcommand 'fit' does not accept option 'trainer.max_step'"),  # a typo in the YAML
    ({}, ["--trainer.maxsteps", "3"], "unrecognized arguments: --trainer.maxsteps 3"),
    ({}, ["--model.arch", "llama"], "model.arch: 'llama' is not allowed; allowed: gpt_oss, mixtral, qwen3_moe"),
    ({}, ["--trainer.max_steps", "abc"], "trainer.max_steps: expected an int, got 'abc'"),
])
def test_other_bad_options_are_one_line_too(tmp_path, capsys, trainer, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(_config(tmp_path, trainer=trainer)), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lightning-te-moe fit: error: {message}\n") and "usage:" not in err


def test_recipe_this_machine_cannot_run_is_one_line_listing_what_it_runs(tmp_path, capsys, cpu_kind):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(_config(tmp_path, recipe="fp8_current"))])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-te-moe fit: error: recipe 'fp8_current' cannot run on cpu")
    assert f"[{cpu_kind[2]}: torch CPU autocast]. Recipes allowed here: bf16, fp32." in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
