"""Guard settings from YAML through the CLI (jsonargparse validates the GuardConfig dataclass)."""

from pathlib import Path

import pytest
import torch
import yaml

from lightning_te_moe.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **plugin_args) -> Path:
    config = yaml.safe_load((ROOT / "examples/configs/gpt_oss_tiny.yaml").read_text())
    config["trainer"].update(max_steps=3, val_check_interval=3, limit_val_batches=1, default_root_dir=str(tmp_path),
                             enable_progress_bar=False, logger=False)
    config["trainer"]["plugins"][0]["init_args"].update(plugin_args)
    config["model"].update(hidden_size=32, intermediate_size=32, num_experts=4)
    config["data"].update(seq_len=32, batch_size=4, max_bytes=100_000)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_guard_config_from_yaml_reaches_the_guard(tmp_path: Path) -> None:
    main(["fit", "--config", str(_config(tmp_path, guard_config={"window": 40, "rollback": "nonfinite",
                                                                 "promote_after": 500, "repeat_window": 50,
                                                                 "snapshot_budget": 0.01}))])
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    guard = ckpt["TEMoEPrecision"]["guard"]
    assert guard["rollbacks"] == 0 and len(guard["detector"]["loss"]["window"]) == 3
    assert (tmp_path / "precision_decisions.jsonl").exists()


@pytest.mark.parametrize(("args", "message"), [
    ({"guard_config": {"rollback": "sometimes"}}, "sometimes"),
    ({"guard_config": {"windw": 10}}, "windw"),
    ({"guard": "maybe"}, "maybe"),
])
def test_bad_guard_settings_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture, args: dict, message: str) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config(tmp_path, **args))])
    assert message in capsys.readouterr().err
