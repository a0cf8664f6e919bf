"""Guard settings from YAML through the CLI (jsonargparse validates the GuardConfig dataclass)."""

from pathlib import Path

import pytest
import torch
import yaml
from cli_support import main_job_config

from lightning_te_moe.cli import main


def _config(tmp_path: Path, **plugin_args) -> Path:
    config = main_job_config(tmp_path, max_steps=3, val_check_interval=3, limit_val_batches=2,
                             enable_progress_bar=False, logger=False)
    config["trainer"]["plugins"][0]["init_args"].update(plugin_args)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_guard_config_from_yaml_reaches_the_guard(tmp_path: Path) -> None:
    main(["fit", "--config", str(_config(tmp_path, guard_config={"window": 40, "rollback": "nonfinite",
                                                                 "promote_after": 500, "repeat_window": 50,
                                                                 "snapshot_budget": 0.01}))])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    guard = ckpt["TEMoEPrecision"]["guard"]
    assert guard["rollbacks"] == 0 and len(guard["detector"]["loss"]["window"]) == 3
    assert (tmp_path / "precision_decisions.jsonl").exists()


@pytest.mark.parametrize(("args", "message"), [
    ({"guard_config": {"rollback": "sometimes"}}, "trainer.plugins.guard_config.rollback"
                                                  " (lightning_te_moe.GuardConfig): 'sometimes' is not allowed;"
                                                  " allowed: nonfinite, always, never"),
    ({"guard_config": {"windw": 10}}, "trainer.plugins.guard_config (lightning_te_moe.GuardConfig): unknown option"
                                      " 'windw' (did you mean 'window'?); its options are: window, warmup,"),
    ({"guard": "maybe"}, "trainer.plugins.guard (lightning_te_moe.TEMoEPrecision): expected a bool, got 'maybe'"),
    # GuardConfig's own check, raised while the classes are built: one line, not two chained tracebacks
    ({"guard_config": {"window": 0}}, "GuardConfig.window must be >= 1, got 0"),
])
def test_bad_guard_settings_fail_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: dict,
                                               message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(_config(tmp_path, **args))])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lightning-te-moe fit: error: {message}") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2
