"""The torch dispatch without host split sizes (``make_dispatch(host_splits=False)``), for grouped GEMMs that read
their offsets on the device: an upper-bound buffer, every slot where the exact dispatch puts it, the slack rows in
the last expert's block, and the same layer function (outputs and gradients) as the exact dispatch."""

from __future__ import annotations

import pytest
import torch

from lightning_te_moe.experts.routing import combine, make_dispatch, permute, upper_bound_rows


def _routing(tokens: int, experts: int, top_k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, experts, (tokens, top_k), generator=gen)
    index[0, 0] = experts  # an expert-parallel sentinel: dropped
    index[1, 1] = -1
    index[2, 1] = index[2, 0]  # one token naming one expert twice: two rows, as the exact dispatch gives it
    return index


def _grouped(rows: torch.Tensor, weight: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
    """``rows[r] @ weight[e(r)].T`` row by row: a grouped GEMM that only needs each row's expert."""
    return torch.einsum("ri,roi->ro", rows, weight[row_expert])


@pytest.mark.parametrize("align", [1, 16])
def test_every_slot_lands_where_the_exact_dispatch_puts_it(align: int) -> None:
    index = _routing(37, 6, 3, seed=1)
    exact, free = make_dispatch(index, 6, align), make_dispatch(index, 6, align, host_splits=False)
    assert free.splits is None and free.rows == upper_bound_rows(37, 3, 6, align, merges_repeats=False)
    assert free.rows % align == 0 and free.rows >= exact.rows
    kept = exact.slot_row < exact.rows
    assert torch.equal(free.slot_row[kept], exact.slot_row[kept])
    assert (free.slot_row[~kept] == free.rows).all()  # dropped slots read the zero row
    assert torch.equal(free.row_slot[:exact.rows], exact.row_slot)
    assert (free.row_slot[exact.rows:] == 37 * 3).all()  # slack: padding rows
    sizes = free.device_splits.tolist()
    assert sizes[:-1] == exact.splits[:-1] and sum(sizes) == free.rows and sizes[-1] % align == 0
    assert free.offsets[-1].item() == free.rows
    assert torch.equal(free.row_expert[:exact.rows], exact.row_expert)


def test_the_layer_function_and_gradients_are_those_of_the_exact_dispatch() -> None:
    index = _routing(29, 5, 2, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(29, 8, generator=gen, dtype=torch.float64)
    weights = torch.rand(29, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 12, 8, generator=gen, dtype=torch.float64)

    def run(host_splits: bool) -> list[torch.Tensor]:
        xi, wi, ww = (t.clone().requires_grad_(True) for t in (x, weights, w))
        d = make_dispatch(index, 5, 16, host_splits=host_splits)
        out = combine(_grouped(permute(xi, d), ww, d.row_expert), wi, d)
        (out.square().sum() + out[:, 0].sum()).backward()
        return [out.detach(), xi.grad, wi.grad, ww.grad]

    for got, want in zip(run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_bf16_experts_take_grouped_mm_only_where_te_would_run_one_gemm_per_expert(monkeypatch) -> None:
    from lightning_te_moe.experts.gemm import GROUPED_MM_MAX_TOKENS, grouped_mm_runs, prefer_grouped_mm

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])

    assert prefer_grouped_mm(1024, None, native=False)
    assert prefer_grouped_mm(GROUPED_MM_MAX_TOKENS, None, native=False)
    assert not prefer_grouped_mm(GROUPED_MM_MAX_TOKENS + 1, None, native=False)  # large batches: TE's GEMMs win
    assert not prefer_grouped_mm(1024, None, native=True)  # TE's native grouped GEMM: one launch already
    assert not prefer_grouped_mm(1024, object(), native=False)  # a quantized recipe: TE
    cuda = torch.device("cuda")
    assert grouped_mm_runs(cuda, torch.bfloat16, [2880, 5760, 16])
    assert not grouped_mm_runs(cuda, torch.bfloat16, [2880, 5760, 4])  # a LoRA rank of 4
    assert not grouped_mm_runs(cuda, torch.float16, [2880, 5760])
    assert not grouped_mm_runs(torch.device("cpu"), torch.bfloat16, [2880, 5760])
    capability[0] = (12, 1)  # no torch grouped_mm kernels for SM120/SM121
    assert not grouped_mm_runs(cuda, torch.bfloat16, [2880, 5760, 16])


def test_a_dispatch_without_host_splits_refuses_the_per_expert_loop() -> None:
    from lightning_te_moe.experts.gemm import torch_grouped_linear

    d = make_dispatch(torch.randint(0, 4, (6, 2)), 4, host_splits=False)
    with pytest.raises(ValueError, match="without host split sizes needs torch's grouped_mm"):
        torch_grouped_linear(torch.randn(d.rows, 8), torch.randn(4, 8, 8), d.offsets, d.splits)
