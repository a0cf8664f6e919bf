"""A real ``Trainer.fit`` with ``TEMoEPrecision()``: the swap happens at setup, before the optimizer exists,
and the checkpoint loads into the unswapped model and resumes into a freshly swapped one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from experts_helpers import rel_err, tiny_model

from lightning_te_moe import TEMoEPrecision
from lightning_te_moe.experts import GroupedExperts


class TinyGptOss(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_model("gpt_oss").train()
        self.optimizer_params: list[int] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        self.optimizer_params = [id(p) for group in optimizer.param_groups for p in group["params"]]
        return optimizer


def _loader() -> torch.utils.data.DataLoader:
    data = torch.randint(0, 64, (12, 10), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(root: Path, plugin: TEMoEPrecision, steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, plugins=[plugin], max_steps=steps, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


def test_fit_swaps_before_the_optimizer_and_checkpoints_load_both_ways(tmp_path: Path) -> None:
    plugin, module = TEMoEPrecision(print_plan=False), TinyGptOss()
    trainer = _trainer(tmp_path, plugin, steps=3)
    trainer.fit(module, _loader())

    experts = [m for m in module.modules() if isinstance(m, GroupedExperts)]
    assert len(experts) == 2 and all(m.state is plugin.state for m in experts)
    swap = [d for d in plugin.decisions.decisions if d.kind == "swap"]
    assert len(swap) == 1 and swap[0].reason.startswith("swapped 2 expert layer(s) of TinyGptOss (GptOssExperts)")
    assert {e["status"] for e in swap[0].evidence["entries"]} == {"swapped"}
    assert {id(m.fc1.weight) for m in experts} <= set(module.optimizer_params)  # optimizer holds the new params

    ckpt = tmp_path / "swapped.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    key = "model.model.layers.0.mlp.experts.gate_up_proj"  # the original layout
    assert not torch.equal(state[key], tiny_model("gpt_oss").state_dict()[key.removeprefix("model.")])  # trained

    plain = TinyGptOss()
    plain.model = tiny_model("gpt_oss", seed=5)
    plain.load_state_dict(state, strict=True)  # the unswapped model
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert rel_err(plain(ids), module.eval()(ids)) <= 1e-6

    resumed = TinyGptOss()
    resumed_trainer = _trainer(tmp_path, TEMoEPrecision(print_plan=False), steps=4)
    resumed_trainer.fit(resumed, _loader(), ckpt_path=ckpt)  # weights restored, swapped, optimizer state restored
    assert resumed_trainer.global_step == 4
    assert sum(isinstance(m, GroupedExperts) for m in resumed.modules()) == 2
