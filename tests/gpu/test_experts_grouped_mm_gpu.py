"""BF16 experts at fine-tuning sizes where TE would run one GEMM per expert: torch's grouped_mm, no host sync."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
    pytest.skip("needs CUDA and Transformer Engine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts_helpers import cuda_experts_layer, cuda_topk_routing, layer_step, precision_state, rel_err  # noqa: E402

from lightning_te_moe.experts import ExpertSwapConfig, swap_experts  # noqa: E402
from lightning_te_moe.experts import module as experts_module  # noqa: E402
from lightning_te_moe.experts.gemm import native_grouped_gemm  # noqa: E402
from lightning_te_moe.experts.te_routing import fused_permutation_available  # noqa: E402


def _swapped(arch: str) -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(cuda_experts_layer(arch))
    swap_experts(holder, ExpertSwapConfig(), state=precision_state("bf16"))
    return holder.experts




@pytest.mark.grouped_mm
@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
def test_grouped_mm_path_matches_te_and_never_syncs(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if native_grouped_gemm(None, torch.bfloat16):
        pytest.skip("TE's native grouped GEMM runs BF16 on this stack: it is taken instead")
    ours = _swapped(arch)
    routed: list[bool] = []  # host_splits of each fused routing: TE's permutation kernels serve grouped_mm too
    real = experts_module.fused_routing
    monkeypatch.setattr(experts_module, "fused_routing",
                        lambda *args, **kwargs: routed.append(kwargs["host_splits"]) or real(*args, **kwargs))
    batch = cuda_topk_routing(1000, seed=2, empty_from=6)
    layer_step(ours, *batch)  # warm-up (TE's activation kernel, the allocator)
    ours.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = layer_step(ours, *batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not ours._engines  # no TE GEMM engine was built: grouped_mm ran
    if fused_permutation_available():
        assert routed and not any(routed), routed  # TE's permutation, split sizes left on the device
    te = _swapped(arch)
    monkeypatch.setattr(experts_module, "prefer_grouped_mm", lambda tokens, recipe, native: False)
    want = layer_step(te, *batch)
    assert te._engines  # TE's per-expert path ran
    # Parameter gradients too: the fc1 bias's comes out of the fused bias + GLU kernel on this path.
    got.update({n: p.grad.float() for n, p in ours.named_parameters()})
    want.update({n: p.grad.float() for n, p in te.named_parameters()})
    assert "fc2.weight" in got and ("fc1.bias" in got or arch != "gpt_oss"), sorted(got)
    errors = {k: rel_err(got[k], want[k]) for k in got}
    print(arch, "grouped_mm vs TE split", errors)
    assert max(errors.values()) <= 1e-2, errors
