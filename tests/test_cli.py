"""The ``lightning-te-moe`` command: ``plan`` (table, JSON, --assume-* flags, bad flags) and LightningCLI ``fit``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cpu_kinds import cpu_kind, this_machines_cpu_plan  # noqa: F401 - cpu_kind is a fixture

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
    assert plan["experts"]["name"] == "fp8_current"
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


def _config(tmp_path: Path, **plugin_args) -> Path:
    config = yaml.safe_load((ROOT / "examples/configs/gpt_oss_tiny.yaml").read_text())
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=2, default_root_dir=str(tmp_path),
                             enable_progress_bar=False, logger=False)
    config["trainer"]["plugins"][0]["init_args"].update(plugin_args)
    config["model"].update(hidden_size=32, intermediate_size=32, num_experts=4)
    config["data"].update(seq_len=32, batch_size=4, max_bytes=200_000)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_from_yaml_with_the_plugin(tmp_path, capsys):
    main(["fit", "--config", str(_config(tmp_path, recipe="auto", deny=["fp16"], cache_quantized_weights=False))])
    out = capsys.readouterr().out
    assert "lightning-te-moe precision plan" in out
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "fit should have written a checkpoint"
    import torch

    ckpt = torch.load(ckpts[0], weights_only=False)
    assert ckpt["global_step"] == 4
    state = ckpt["TEMoEPrecision"]
    assert state["plan"]["request"]["deny"] == ["fp16"] and state["rung"] == 0


@pytest.mark.parametrize(("args", "message"), [
    ({"recipe": "fp9"}, "Expected a typing.Literal['auto', 'bf16', 'fp16', 'fp32', 'fp8_delayed', 'fp8_current',"
                        " 'fp8_block', 'mxfp8', 'nvfp4']"),
    ({"deny": ["int8"]}, "int8"),
    ({"params_dtype": "float8"}, "float8"),
])
def test_fit_yaml_with_bad_plugin_args_fails_clearly(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config(tmp_path, **args))])
    err = capsys.readouterr().err
    assert message in err
