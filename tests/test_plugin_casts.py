"""What ``convert_module`` casts: trainable parameters become master weights in ``params_dtype``; a frozen base keeps
its own dtype while every rung runs under autocast (a frozen BF16 base cast to FP32 doubles its memory)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_te_moe import TEMoEPrecision


class FrozenBase(BoringModel):
    """A frozen BF16 base layer under a trainable head, as a LoRA fine-tune has it."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(32, 32).to(torch.bfloat16).requires_grad_(False)
        self.register_buffer("scale", torch.ones(32, dtype=torch.bfloat16))

    def forward(self, x):
        return self.layer(self.base(x * self.scale))


def _fit(plugin: TEMoEPrecision, model: BoringModel, tmp_path) -> None:
    L.Trainer(plugins=[plugin], max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1).fit(model)


def test_frozen_base_keeps_its_dtype_under_autocast(tmp_path):
    model = FrozenBase()
    _fit(TEMoEPrecision("bf16", print_plan=False), model, tmp_path)
    assert model.base.weight.dtype == torch.bfloat16 and model.base.bias.dtype == torch.bfloat16
    assert model.layer.weight.dtype == torch.float32  # trainable: FP32 master weights
    assert model.scale.dtype == torch.float32  # buffers follow params_dtype, as before


def test_a_ladder_with_an_fp32_rung_casts_frozen_parameters_too(tmp_path):
    model = FrozenBase()
    _fit(TEMoEPrecision("fp32", print_plan=False), model, tmp_path)  # no autocast: BF16 weights could not run
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_params_dtype_bfloat16_leaves_nothing_in_fp32(tmp_path):
    model = FrozenBase()
    _fit(TEMoEPrecision("bf16", params_dtype="bfloat16", print_plan=False), model, tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
