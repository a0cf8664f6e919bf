"""Shared pieces for the guard tests: CPU-runnable plans, a tiny model, fault injection.

The plugin's plan on a CPU has a single rung; to exercise step-downs on CPU the tests override
``TEMoEPrecision.make_plan`` (the documented hook) with CPU-runnable ladders chosen by the ``recipe``
argument, so that a resume with a changed recipe changes the plan as it does on a GPU. No TE recipe is
ever entered on CPU.
"""

from __future__ import annotations

import dataclasses

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_te_moe import Plan, Reason, RecipeSpec, Rung, TEMoEPrecision, probe_environment

BF16 = Rung(RecipeSpec.of("bf16"), RecipeSpec.of("bf16"))
FP32 = Rung(RecipeSpec.of("fp32"), RecipeSpec.of("fp32"))
CPU_LADDER = (BF16, FP32)


class CpuLadderPrecision(TEMoEPrecision):
    """TEMoEPrecision whose plan on this CPU is bf16 -> fp32 for ``recipe="auto"``, and the single named rung
    for ``recipe="bf16"`` or ``"fp32"`` (a plan whose first rung is its last, as a BF16 plan on a GPU)."""

    ladders = {"auto": CPU_LADDER, "bf16": (BF16,), "fp32": (FP32,)}

    def make_plan(self, device: torch.device, torch_compile: bool = False, environment: Any = None,
                  sharded: bool = False, processes: int = 1) -> Plan:
        ladder = tuple(r for r in self.ladders[self.request.recipe] if r.dense.name not in self.request.deny)
        request = dataclasses.replace(self.request, sharded=sharded, processes=processes)
        return Plan(ladder=ladder, environment=probe_environment(device), request=request.to_dict(),
                    cuda_graphs=bool(request.cuda_graphs),
                    reasons=(Reason("test", "CPU ladder for guard tests"),))


class ThreeRungPrecision(CpuLadderPrecision):
    """bf16 -> bf16 with fp32 experts -> fp32: a rung above the last after one step-down (for cooldown)."""

    ladders = {**CpuLadderPrecision.ladders,
               "auto": (BF16, Rung(RecipeSpec.of("bf16"), RecipeSpec.of("fp32")), FP32)}


class TinyRegression(LightningModule):
    """A small MLP on a fixed random regression task; returns a NaN loss at the steps ``nan_at`` on one rank.

    ``losses`` keeps every micro-batch's loss by optimizer step, as the model computed it.
    """

    def __init__(self, lr: float = 1e-2, nan_at: tuple[int, ...] = (), nan_rank: int = 0, fused: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.losses: dict[int, list[float]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        if self.global_step in self.hparams.nan_at and self.global_rank == self.hparams.nan_rank:
            loss = loss * float("nan")
        self.losses.setdefault(self.global_step + 1, []).append(float(loss))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, fused=self.hparams.fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s / 1000))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64 * 32, 8, generator=g)
        y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.05 * torch.randn(x.shape[0], 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


class LrBoost(Callback):
    """Multiplies every learning rate by ``factor`` before optimizer step ``at`` (the batch at ``global_step ==
    at``); with ``persistent`` before every step from then on (the scheduler resets it each step)."""

    def __init__(self, at: int, factor: float = 1e4, persistent: bool = False) -> None:
        self.at, self.factor, self.persistent, self.fired_at = at, factor, persistent, None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.at and (self.fired_at is None or self.persistent):
            self.fired_at = self.fired_at if self.fired_at is not None else trainer.global_step
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= self.factor


class StepRecorder(Callback):
    """The trainable parameters and the optimizer's step count after every optimizer step."""

    def __init__(self) -> None:
        self.params: dict[int, torch.Tensor] = {}
        self.adam_steps: dict[int, int] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self.params[step] = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])
        states = trainer.optimizers[0].state.values()
        self.adam_steps[step] = int(next(iter(states))["step"]) if states else 0


def read_jsonl(path: Any) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
