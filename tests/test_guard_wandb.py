"""W&B in offline mode: the run file holds the plan in the config, the decisions table, the level metric,
the alerts and the summary fields. The ``.wandb`` file is read back with a small log-format reader, once wandb's
service process has written the run's exit record (``wandb.finish()`` can return before the file is complete)."""

import json
import struct
import time
from pathlib import Path
from typing import Iterator

import pytest

wandb = pytest.importorskip("wandb")
from guard_support import CpuLadderPrecision, TinyRegression  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

from lightning_te_moe.guard.wandb_sink import TABLE_COLUMNS  # noqa: E402

BLOCK = 32768


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a ``.wandb`` file (a 7-byte header, then LevelDB-log framing in 32 KiB blocks)."""
    data, pos, buf = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zero padding, or a record still being written
            return
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def finished_run(root: Path, timeout: float = 60.0) -> tuple[Path, list[wandb_internal_pb2.Record]]:
    """The offline run directory and its records, once the run's exit record (written last) is on disk."""
    deadline, seen = time.monotonic() + timeout, "no offline run directory"
    while time.monotonic() < deadline:
        for run_file in root.glob("wandb/offline-run-*/run-*.wandb"):
            records = list(read_records(run_file))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return run_file.parent, records
            seen = f"{len(records)} records, no exit record yet"
        time.sleep(0.2)
    raise AssertionError(f"wandb did not finish writing its run file under {root} in {timeout:.0f} s ({seen})")


def items(update) -> dict:
    return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in update}


def test_offline_run_holds_plan_table_level_alerts_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    plugin = CpuLadderPrecision(print_plan=False)
    logger = WandbLogger(project="guard-test", save_dir=str(tmp_path), offline=True)
    trainer = Trainer(max_steps=100, plugins=[plugin], logger=logger, accelerator="cpu", enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=10, default_root_dir=tmp_path)
    trainer.fit(TinyRegression(nan_at=(40, 50)))  # a skipped batch, then a repeat: a step-down
    wandb.finish()

    run_dir, records = finished_run(tmp_path)
    config, history, summary, alerts = {}, [], {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update(items(record.config.update))
        elif kind == "run":  # wandb may fold early config updates into the run record
            config.update(items(record.run.config.update))
        elif kind == "history":
            history.append(items(record.history.item))
        elif kind == "summary":
            summary.update(items(record.summary.update))
        elif kind == "alert":
            alerts.append((record.alert.title, record.alert.level))

    assert "precision/plan" in config, (sorted(config), sorted(p.name for p in run_dir.rglob("*")))
    assert config["precision/plan"]["ladder"][1]["dense"]["name"] == "fp32"
    assert config["precision/plan_summary"] == "bf16 -> fp32"
    assert config["precision/environment"]["device_type"] == "cpu"

    levels = {h["trainer/global_step"]: h["precision/level"] for h in history if "precision/level" in h}
    assert levels[0] == 0 and levels[9] == 0 and levels[50] == 1 and levels[99] == 1

    assert alerts == [("lightning-te-moe: step_down at step 51", "WARN")]
    assert summary["precision/final_recipe"] == "fp32" and summary["precision/step_downs"] == 1
    assert summary["precision/rollbacks"] == 0
    skipped = {h["trainer/global_step"]: h["precision/skipped_steps"] for h in history if "precision/skipped_steps" in h}
    assert skipped[9] == 0 and skipped[99] == 1

    # the last logged table holds every decision, in order
    assert summary["precision/decisions/_type"] == "table-file"
    table = json.loads((run_dir / "files" / summary["precision/decisions/path"]).read_text())
    assert table["columns"] == TABLE_COLUMNS
    kinds = [row[TABLE_COLUMNS.index("kind")] for row in table["data"]]
    assert [k for k in kinds if k not in ("swap", "snapshot")] == ["plan", "skip", "step_down"]
    step_down = table["data"][kinds.index("step_down")]
    assert step_down[:2] == [51, 0] and step_down[4:7] == ["bf16", "fp32", "nonfinite_loss"]
    assert json.loads(step_down[-1])["value"] == "nan"


def test_without_wandb_installed_nothing_breaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    plugin = CpuLadderPrecision(print_plan=False)
    trainer = Trainer(max_steps=60, plugins=[plugin], accelerator="cpu", logger=CSVLogger(tmp_path),
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(TinyRegression(nan_at=(30, 40)))
    assert plugin.decisions.count("step_down") == 1 and trainer.global_step == 60
