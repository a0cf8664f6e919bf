"""The copy-free pieces around the grouped GEMMs: packed expert weight gradients, the in-place bias add, dispatch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_te_moe.experts.gemm import expert_views, packed_view
from lightning_te_moe.experts.routing import add_expert_bias, make_dispatch


PACKED: list[torch.Tensor] = []


class _PackedWgrad(torch.autograd.Function):
    """Stands in for TE's GroupedLinear: y_e = x_e @ w_e.T, weight gradients returned as rows of one buffer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, splits: list[int], *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        ctx.splits = splits
        return torch.cat([c @ w.t() for c, w in zip(x.split(splits), weights)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, *weights = ctx.saved_tensors
        packed = torch.empty(len(weights), *weights[0].shape, dtype=grad.dtype)
        PACKED.append(packed)
        for i, (g, c) in enumerate(zip(grad.split(ctx.splits), x.split(ctx.splits))):
            packed[i] = g.t() @ c
        dx = torch.cat([g @ w for g, w in zip(grad.split(ctx.splits), weights)])
        return (dx, None, *[packed[i] for i in range(len(weights))])


def test_packed_expert_gradients_become_the_weight_gradient_without_a_copy() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 6, 5, requires_grad=True)
    x = torch.randn(9, 5)
    splits = [3, 0, 4, 2]
    grad = torch.randn(9, 6)
    _PackedWgrad.apply(x, splits, *expert_views(weight)).backward(grad)
    want = torch.stack([g.t() @ c for g, c in zip(grad.split(splits), x.split(splits))])
    assert torch.equal(weight.grad, want)
    assert weight.grad.is_contiguous() and weight.grad.shape == weight.shape
    assert weight.grad.data_ptr() == PACKED[-1].data_ptr()  # the packed buffer itself: no stack copy

    # The same through plain unbind (stack backward) gives the same numbers.
    ref = weight.detach().clone().requires_grad_(True)
    _PackedWgrad.apply(x, splits, *ref.unbind(0)).backward(grad)
    assert torch.equal(weight.grad, ref.grad)


def test_packed_view_shares_storage_and_rejects_other_layouts() -> None:
    packed = torch.randn(3, 4, 2)
    view = packed_view([packed[i] for i in range(3)], packed.shape)
    assert view is not None and view.data_ptr() == packed.data_ptr() and torch.equal(view, packed)
    assert packed_view([packed[i] for i in (0, 2, 1)], packed.shape) is None  # out of order
    assert packed_view([packed[0], None, packed[2]], packed.shape) is None
    assert packed_view([torch.randn(4, 2) for _ in range(3)], packed.shape) is None  # separate storages
    assert packed_view([packed[i] for i in range(2)], packed.shape) is None


def test_expert_views_fall_back_to_stacking_with_missing_gradients() -> None:
    weight = torch.randn(3, 2, 2, requires_grad=True)
    views = expert_views(weight)
    (views[0].sum() + 2 * views[2].sum()).backward()
    assert torch.equal(weight.grad, torch.stack([torch.ones(2, 2), torch.zeros(2, 2), 2 * torch.ones(2, 2)]))


def test_expert_views_of_frozen_weights_record_no_graph() -> None:
    weight = torch.randn(3, 2, 2)
    views = expert_views(weight)
    assert all(v.grad_fn is None and not v.requires_grad for v in views)
    assert views[1].data_ptr() == weight[1].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_bias_add_equals_gather_add_bitwise(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    index = torch.randint(0, 5, (37, 2))
    dispatch = make_dispatch(index, 6, align=4)
    rows = torch.randn(dispatch.rows, 8, dtype=dtype)
    bias = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    want = rows + bias.detach()[dispatch.row_expert]
    h = rows.clone().requires_grad_(True)
    got = add_expert_bias(h * 1, bias, dispatch)  # a fresh tensor, as a GEMM output is
    assert torch.equal(got.detach(), want)
    grad = torch.randn_like(got)
    got.backward(grad)
    assert torch.equal(h.grad, grad)
    want_bias = torch.nn.functional.one_hot(dispatch.row_expert, 6).to(dtype).t() @ grad
    assert torch.equal(bias.grad, want_bias)


def test_in_place_bias_add_refuses_a_tensor_saved_for_backward() -> None:
    index = torch.randint(0, 3, (10, 2))
    dispatch = make_dispatch(index, 3)
    h = torch.randn(dispatch.rows, 4, requires_grad=True)
    rows = h * 1
    used = rows * rows  # saves rows for its backward
    out = add_expert_bias(rows, torch.randn(3, 4, requires_grad=True), dispatch)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + used.sum()).backward()


def test_dispatch_counts_offsets_and_rows_match_a_reference() -> None:
    torch.manual_seed(0)
    experts, align = 7, 8
    index = torch.randint(-1, experts + 1, (50, 3))  # includes dropped slots on both sides
    d = make_dispatch(index, experts, align)
    flat = index.reshape(-1)
    counts = [int(((flat == e)).sum()) for e in range(experts)]
    assert d.splits == [-(-c // align) * align for c in counts]
    assert d.offsets.tolist() == torch.tensor(d.splits).cumsum(0).tolist()
    assert d.row_expert.tolist() == [e for e, s in enumerate(d.splits) for _ in range(s)]
    start = 0
    for e, (c, s) in enumerate(zip(counts, d.splits)):
        block = d.row_slot[start:start + s].tolist()
        assert block[c:] == [flat.numel()] * (s - c)  # padding rows
        assert block[:c] == [i for i in range(flat.numel()) if flat[i] == e]  # stable order
        start += s
    valid = (flat >= 0) & (flat < experts)
    assert (d.slot_row[~valid] == d.rows).all() and d.dropped
    assert (d.row_slot[d.slot_row[valid]] == torch.nonzero(valid).squeeze(1)).all()


class _ViewOutput(torch.autograd.Function):
    """Returns a view created inside the Function, as TE's GroupedLinear does (``out.view(...)``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).view(-1, x.size(1))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


def test_in_place_bias_add_takes_a_view_made_inside_a_custom_function() -> None:
    dispatch = make_dispatch(torch.randint(0, 3, (10, 2)), 3)
    x = torch.randn(dispatch.rows, 4, requires_grad=True)
    bias = torch.randn(3, 4, requires_grad=True)
    out = add_expert_bias(_ViewOutput.apply(x), bias, dispatch)
    assert torch.equal(out.detach(), 2 * x.detach() + bias.detach()[dispatch.row_expert])
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    assert torch.equal(bias.grad, torch.bincount(dispatch.row_expert, minlength=3).float()[:, None].expand(3, 4))
