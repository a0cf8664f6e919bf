"""Shared pieces for the guard tests: a CPU-runnable two-rung plan, a tiny model, fault injection.

The plugin's plan on a CPU has a single fp32 rung; to exercise step-downs on CPU the tests override
``TEMoEPrecision.make_plan`` (the documented hook) with a bf16 -> fp32 ladder. No TE recipe is ever
entered on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_te_moe import Plan, Reason, RecipeSpec, Rung, TEMoEPrecision, probe_environment

CPU_LADDER = (Rung(RecipeSpec.of("bf16"), RecipeSpec.of("bf16")), Rung(RecipeSpec.of("fp32"), RecipeSpec.of("fp32")))


class CpuLadderPrecision(TEMoEPrecision):
    """TEMoEPrecision whose plan is bf16 -> fp32 on this CPU (for tests of step-down)."""

    def make_plan(self, device: torch.device, torch_compile: bool = False, environment: Any = None) -> Plan:
        return Plan(ladder=CPU_LADDER, environment=probe_environment(device),
                    reasons=(Reason("test", "two-rung CPU ladder for guard tests"),))


class TinyRegression(LightningModule):
    """A small MLP on a fixed random regression task; returns a NaN loss at the steps ``nan_at`` on one rank."""

    def __init__(self, lr: float = 1e-2, nan_at: tuple[int, ...] = (), nan_rank: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        if self.global_step in self.hparams.nan_at and self.global_rank == self.hparams.nan_rank:
            loss = loss * float("nan")
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s / 1000))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64 * 32, 8, generator=g)
        y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.05 * torch.randn(x.shape[0], 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


class LrBoost(Callback):
    """Multiplies every learning rate by ``factor`` once, before optimizer step ``at``."""

    def __init__(self, at: int, factor: float = 1e4) -> None:
        self.at, self.factor, self.fired_at = at, factor, None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at and self.fired_at is None:
            self.fired_at = trainer.global_step
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= self.factor


def read_jsonl(path: Any) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
