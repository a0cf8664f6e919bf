"""``TextProgressBar``: whole lines a log file or pipe can hold (rich's bar prints nothing off a terminal)."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_te_moe import TextProgressBar


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train_loss", out["loss"], prog_bar=True)
        return out

    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)["x"]
        self.log("val_loss", loss, prog_bar=True)


def test_lines_every_n_steps_per_validation_and_at_the_end(tmp_path, capsys):
    trainer = L.Trainer(max_steps=6, val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=1,
                        callbacks=[TextProgressBar(every_n_steps=2)], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(LoggingModel())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[progress]")]
    assert lines[0] == "[progress] training from step 0 to step 6"
    step_lines = [line for line in lines if line.startswith("[progress] step ")]
    assert [line.split()[2] for line in step_lines] == ["2/6", "4/6", "6/6"]
    assert all("train_loss " in line and " elapsed" in line for line in step_lines)
    validations = [line for line in lines if "validation at step" in line]
    assert [v.split(":")[0] for v in validations] == ["[progress] validation at step 3",
                                                     "[progress] validation at step 6"]  # not the sanity check
    assert all("val_loss " in v for v in validations)
    assert lines[-1].startswith("[progress] training done at step 6 in ")


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match=r"TextProgressBar\(every_n_steps=0\): must be a positive number of steps"):
        TextProgressBar(every_n_steps=0)
