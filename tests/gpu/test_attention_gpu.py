"""GPT-OSS attention on TE fused attention (learnable sinks) vs the model's eager attention, on a GPU."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
    pytest.skip("needs CUDA and Transformer Engine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts_helpers import rel_err, tiny_model  # noqa: E402

from lightning_te_moe.attention import swap_attention  # noqa: E402
from lightning_te_moe.attention.dispatch import SWAP_ATTR  # noqa: E402

SEQ = 96  # > the tiny model's sliding window (8): sliding and full layers both matter
# head_dim 64 (cuDNN's fused kernels); every expert chosen, so BF16 noise cannot flip the routing
SIZES = dict(hidden=256, intermediate=256, experts=2, top_k=2, layers=2)


def _step(model, ids, mask, valid, autocast: bool):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[valid], ids.roll(-1, 1)[valid])
    loss.backward()
    return logits.detach()[valid], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True])
def test_te_attention_matches_eager(padded: bool) -> None:
    """Reference: the fp32 model on eager attention. BF16 (autocast) with TE attention must stay within 2e-2 on
    the logits and on every gradient, the sinks' included; BF16 on eager attention is printed for scale."""
    torch.manual_seed(0)
    reference = tiny_model("gpt_oss", **SIZES).cuda()
    swapped = copy.deepcopy(reference)
    swap_attention(swapped, core="te")
    ids = torch.randint(1, 64, (3, SEQ), device="cuda")
    mask = torch.ones(3, SEQ, dtype=torch.long, device="cuda")
    if padded:
        mask[1, 70:] = 0
        mask[2, 33:] = 0
    valid = mask.bool()
    ref_logits, ref_grads = _step(reference, ids, mask, valid, autocast=False)
    bf16_logits, bf16_grads = _step(copy.deepcopy(reference), ids, mask, valid, autocast=True)
    logits, grads = _step(swapped, ids, mask, valid, autocast=True)
    calls = [dict(m.__dict__[SWAP_ATTR].calls) for m in swapped.modules() if SWAP_ATTR in m.__dict__]
    assert calls == [{"core": 1}, {"core": 1}], calls
    errors = {"logits": rel_err(logits, ref_logits), **{k: rel_err(grads[k], ref_grads[k]) for k in ref_grads}}
    eager = {"logits": rel_err(bf16_logits, ref_logits), **{k: rel_err(bf16_grads[k], ref_grads[k]) for k in ref_grads}}
    print("padded" if padded else "unpadded", "TE:", {k: f"{v:.1e}" for k, v in errors.items()})
    print("  bf16 eager:", {k: f"{v:.1e}" for k, v in eager.items()})
    assert grads.keys() == ref_grads.keys() and sum(k.endswith("sinks") for k in grads) == 2
    assert max(errors.values()) <= 2e-2, errors


def test_fit_with_everything_swapped_loss_falls(tmp_path: Path) -> None:
    import lightning as L

    from lightning_te_moe import TEMoEPrecision
    from lightning_te_moe.experts import GroupedExperts

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_model("gpt_oss", hidden=256, intermediate=256, experts=8, top_k=2, layers=2)
            self.losses: list[float] = []

        def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
            logits = self.model(input_ids=batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    data = torch.randint(0, 64, (8, 129), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    plugin = TEMoEPrecision()
    module = Tiny()
    trainer = L.Trainer(accelerator="gpu", devices=1, plugins=[plugin], max_steps=30, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    calls = [m.__dict__[SWAP_ATTR].calls for m in module.modules() if SWAP_ATTR in m.__dict__]
    print("plan:", plugin.plan.summary(), "attention calls:", calls, "losses:", [round(v, 3) for v in module.losses[::5]])
    assert sum(isinstance(m, GroupedExperts) for m in module.modules()) == 2
    assert len(calls) == 2 and all(c == {"core": 30} for c in calls)
    assert any(d.kind == "swap" and "TE learnable-softmax" in d.reason for d in plugin.decisions.decisions)
    assert all(math.isfinite(v) for v in module.losses)
    assert sum(module.losses[-5:]) / 5 < 0.7 * sum(module.losses[:5]) / 5
