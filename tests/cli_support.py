"""The main job's config for CLI tests: the example config, made tiny, writing everything under a temp dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples/configs/gpt_oss_tiny.yaml"


def main_job_config(tmp_path: Path, **trainer: Any) -> dict[str, Any]:
    """The example config with a small model and data, its logger, checkpoints and root dir under ``tmp_path``
    (every path the example writes to, so nothing lands in the repository's runs/). ``trainer`` overrides
    Trainer arguments; None leaves the example's setting (or Lightning's default) in place."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    for callback in config["trainer"]["callbacks"]:
        callback["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    keep = {k: v for k, v in trainer.items() if v is not None}
    config["trainer"].update(keep)
    config["model"].update(hidden_size=32, intermediate_size=32, num_experts=4)
    config["data"].update(seq_len=32, batch_size=4, max_bytes=200_000)
    return config


class CtrlCAt(Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) at the start of training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
