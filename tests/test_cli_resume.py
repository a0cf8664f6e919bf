"""Interrupting the main job loses nothing: Ctrl-C saves a checkpoint and prints the command that resumes from
it (exit status 130); ``--ckpt_path`` resumes on the same step and rung; the audit file stays in time order
without repeating the setup records."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from cli_support import ROOT, main_job_config

from lightning_te_moe.cli import main, resume_command
from lightning_te_moe.guard.sinks import JSONL_NAME


def _write(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def sigint_handler():
    """Lightning ignores SIGINT once it caught a KeyboardInterrupt (so a second Ctrl-C cannot break its shutdown):
    give the test process its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_ctrl_c_saves_says_how_to_resume_and_the_resume_continues(tmp_path, capsys, sigint_handler):
    config = main_job_config(tmp_path, max_steps=8, val_check_interval=4, limit_val_batches=2,
                             enable_progress_bar=False)
    interrupted = dict(config, trainer=dict(config["trainer"], callbacks=[
        *config["trainer"]["callbacks"], {"class_path": "cli_support.CtrlCAt", "init_args": {"step": 5}}]))
    first = _write(tmp_path, interrupted, "interrupted.yaml")

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(first)])
    assert exc.value.code == 130
    saved = tmp_path / "checkpoints" / "interrupted.ckpt"
    err = capsys.readouterr().err
    assert f"[lightning-te-moe] interrupted at step 5: saved {saved} (weights, optimizer" in err
    assert f"resume with: lightning-te-moe fit --config {first} --ckpt_path {saved}" in err
    ckpt = torch.load(saved, weights_only=False)
    assert ckpt["global_step"] == 5 and ckpt["TEMoEPrecision"]["rung"] == 0

    # the printed command, with the config that has no Ctrl-C in it
    second = _write(tmp_path, config)
    assert main(["fit", "--config", str(second), "--ckpt_path", str(saved)]) == 0
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 8 and final["TEMoEPrecision"]["rung"] == 0

    # the resumed run's audit file: the first run's history once, in time order, then the resume
    logs = sorted((tmp_path / "lightning_logs").glob("version_*"))
    assert len(logs) == 2
    first_records, resumed = _records(logs[0] / JSONL_NAME), _records(logs[1] / JSONL_NAME)
    kinds, first = [r["kind"] for r in resumed], [r["kind"] for r in first_records]
    assert kinds[:len(first) + 1] == first + ["resume"]
    assert set(kinds[len(first) + 1:]) <= {"snapshot"}  # the guard measures its snapshot interval again
    assert kinds.count("plan") == 1 and kinds.count("swap") == 1
    times = [r["wall_time"] for r in resumed]
    assert times == sorted(times)
    resume = resumed[len(first)]
    assert resume["step"] == 5 and resume["reason"].startswith("resumed on rung 0")


def test_ctrl_c_without_an_interrupt_checkpoint_points_to_last_ckpt(tmp_path, capsys, sigint_handler):
    config = main_job_config(tmp_path, max_steps=8, limit_val_batches=0, enable_progress_bar=False)
    config["trainer"]["callbacks"] = [  # ModelCheckpoint only, every 2 steps; Ctrl-C at step 5
        {**config["trainer"]["callbacks"][0], "init_args": {**config["trainer"]["callbacks"][0]["init_args"],
                                                            "every_n_train_steps": 2}},
        {"class_path": "cli_support.CtrlCAt", "init_args": {"step": 5}}]
    path = _write(tmp_path, config)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path)])
    assert exc.value.code == 130
    last = tmp_path / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err
    assert f"[lightning-te-moe] interrupted at step 5; the newest checkpoint is {last}" in err
    assert f"resume with: lightning-te-moe fit --config {path} --ckpt_path {last}" in err
    assert torch.load(last, weights_only=False)["global_step"] == 4


def test_resume_command_replaces_an_earlier_ckpt_path():
    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--trainer.max_steps=9"]
    assert resume_command(argv, "runs/x/interrupted.ckpt") == (
        "lightning-te-moe fit --config 'a b.yaml' --trainer.max_steps=9 --ckpt_path runs/x/interrupted.ckpt")
    assert resume_command(["fit", "--ckpt_path=old.ckpt"], "new.ckpt") == "lightning-te-moe fit --ckpt_path new.ckpt"


@pytest.mark.slow
def test_real_ctrl_c_on_the_command_line(tmp_path):
    """SIGINT to ``lightning-te-moe fit`` with stdout a pipe: progress lines arrive while it runs, then the
    checkpoint, the resume command and exit status 130."""
    config = main_job_config(tmp_path, max_steps=100_000, limit_val_batches=0, log_every_n_steps=2)
    path = _write(tmp_path, config)
    # SIGINT back to its default in the child: a shell starting the tests in the background (`pytest ... &`) makes
    # them ignore it, and an ignored SIGINT is inherited, so the run would never see the Ctrl-C
    process = subprocess.Popen([sys.executable, "-m", "lightning_te_moe.cli", "fit", "--config", str(path)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # stderr drained meanwhile: a full pipe (warnings, decisions) would block the run while we wait on stdout
    errors: list[str] = []
    drains = [threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)]
    drains[0].start()
    try:
        for line in process.stdout:
            if line.startswith("[progress] step 4"):
                break
        else:
            process.wait(timeout=60)
            drains[0].join(timeout=10)
            pytest.fail("no progress line; stderr:\n" + "".join(errors))
        process.send_signal(signal.SIGINT)
        drains.append(threading.Thread(target=process.stdout.read, daemon=True))
        drains[1].start()
        process.wait(timeout=120)
        for drain in drains:
            drain.join(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    err = "".join(errors)
    assert process.returncode == 130, err
    saved = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert f"saved {saved}" in err and f"--config {path} --ckpt_path {saved}" in err
    assert torch.load(saved, weights_only=False)["global_step"] >= 4
