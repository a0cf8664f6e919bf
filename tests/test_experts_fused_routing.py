"""Index math of the fused (TE kernel) routing, checked on the CPU against simple references.

TE's permute kernel puts the token t routed to expert e at row ``pad_offsets[e] + (rows of experts before e,
unpadded) + (rank of t among e's tokens)``; its unpermute reads the same rows back. That placement must be the
torch path's (:func:`make_dispatch`), so both paths feed the GEMMs identical buffers.
"""

from __future__ import annotations

import pytest
import torch
from experts_helpers import te_row_id_map_on_cpu

from lightning_te_moe.experts.routing import make_dispatch
from lightning_te_moe.experts.te_routing import (fused_routing, pad_offsets, padded_counts, padded_row_id_map,
                                                 routing_map_and_probs, upper_bound_rows, zero_padding_rows)


def _routing(tokens: int = 37, experts: int = 8, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts - 3, generator=gen)[:k] for _ in range(tokens)])  # 3 experts empty
    index[::5, 1] = experts  # expert-parallel sentinel: dropped
    index[::7, 0] = -1
    return index, torch.rand(tokens, k, generator=gen)


def test_routing_map_and_probs_match_a_loop() -> None:
    index, weights = _routing()
    weights.requires_grad_(True)
    mask, probs = routing_map_and_probs(index, weights, 8)
    want_mask, want_probs = torch.zeros(37, 8, dtype=torch.bool), torch.zeros(37, 8)
    for t in range(37):
        for j in range(2):
            e = int(index[t, j])
            if 0 <= e < 8:
                want_mask[t, e], want_probs[t, e] = True, weights[t, j]
    assert torch.equal(mask, want_mask) and torch.equal(probs, want_probs.detach())
    assert probs.dtype == torch.float32 and mask.is_contiguous() and probs.is_contiguous()
    (probs * torch.arange(8.0)).sum().backward()  # d/dw = the expert id for kept slots, 0 for dropped ones
    valid = (index >= 0) & (index < 8)
    assert torch.equal(weights.grad, torch.where(valid, index, 0).float() * valid)


def test_pad_offsets_are_the_padding_before_each_expert() -> None:
    counts = torch.tensor([0, 5, 16, 17, 1, 0, 32])
    for align in (1, 16, 32, 128):
        padded = [-(-int(c) // align) * align for c in counts]
        want, acc = [], 0
        for c, p in zip(counts.tolist(), padded):
            want.append(acc)
            acc += p - c
        assert pad_offsets(counts, align).tolist() == want


def test_fused_rows_are_the_torch_dispatch_rows() -> None:
    index, weights = _routing()
    for align in (1, 16, 128):
        fused = fused_routing(index, weights, 8, align)
        dispatch = make_dispatch(index, 8, align)
        assert fused is not None and fused.splits == dispatch.splits and fused.rows == dispatch.rows
        if align == 1:
            assert fused.pad_offsets is None  # no padding rows: TE allocates without zeroing
        counts = fused.routing_map.sum(0).tolist()
        starts = torch.tensor([0, *torch.cumsum(torch.tensor(counts), 0).tolist()[:-1]])
        offsets = fused.pad_offsets if fused.pad_offsets is not None else torch.zeros(8, dtype=torch.long)
        for t in range(index.size(0)):
            for j in range(2):
                e = int(index[t, j])
                if not 0 <= e < 8:
                    assert int(dispatch.slot_row[t * 2 + j]) == dispatch.rows  # dropped on both paths
                    continue
                rank = int(fused.routing_map[:t, e].sum())
                row = int(offsets[e] + starts[e] + rank)  # TE's kernel: pad offset + unpadded row
                assert row == int(dispatch.slot_row[t * 2 + j])


def test_a_repeated_expert_gets_one_row_with_the_summed_weight() -> None:
    """A token that names one expert twice: one mask bit, the two weights added (the same weighted sum), and
    each weight's gradient is that row's gradient."""
    index = torch.tensor([[0, 0], [1, 2], [3, 3]])
    weights = torch.tensor([[0.25, 0.5], [0.1, 0.2], [0.3, 0.4]], requires_grad=True)
    mask, probs = routing_map_and_probs(index, weights, 4)
    assert mask.sum(1).tolist() == [1, 2, 1]
    assert torch.allclose(probs, torch.tensor([[0.75, 0, 0, 0], [0, 0.1, 0.2, 0], [0, 0, 0, 0.7]]))
    (probs * torch.arange(1.0, 5.0)).sum().backward()
    assert weights.grad.tolist() == [[1.0, 1.0], [2.0, 3.0], [4.0, 4.0]]
    route = fused_routing(index, weights.detach(), 4, 16)
    assert route is not None and route.splits == [16, 16, 16, 16]


def test_host_splits_decline_an_empty_routing() -> None:
    assert fused_routing(torch.full((3, 2), 4), torch.rand(3, 2), 4, 16) is None  # every slot dropped


def test_device_splits_without_a_host_sync_cover_an_upper_bound() -> None:
    """``host_splits=False``: the buffer has the upper-bound rows, every expert keeps its padded block and the
    slack is appended to the last expert's block (rows TE zero-fills and no token reads)."""
    for seed in range(4):
        index, weights = _routing(seed=seed)
        index[1] = torch.tensor([2, 2])  # a repeat merges: at most min(k, E) rows per token
        for align in (1, 16, 128):
            exact = fused_routing(index, weights, 8, align)
            free = fused_routing(index, weights, 8, align, host_splits=False)
            assert exact is not None and free is not None and free.splits is None
            assert free.rows == upper_bound_rows(37, 2, 8, align) == -(-(37 * 2 + 8 * (align - 1)) // align) * align
            assert all(s % align == 0 for s in free.device_splits.tolist())  # the last block too (FP8 GEMMs)
            assert free.rows >= exact.rows and int(free.device_splits.sum()) == free.rows
            assert free.device_splits[:-1].tolist() == exact.splits[:-1]
            assert int(free.device_splits[-1]) == exact.splits[-1] + free.rows - exact.rows
            assert free.pad_offsets is not None  # TE zero-fills (forward and backward) only with offsets
            assert free.pad_offsets.tolist() == pad_offsets(free.routing_map.sum(0), align).tolist()
    assert upper_bound_rows(5, 4, 2, 16) == 48  # k > E: a token fills at most E rows (10 + 30, rounded up)
    counts = torch.tensor([0, 3, 16, 17])
    assert padded_counts(counts, 16).tolist() == [0, 16, 16, 32]


def test_the_padded_row_map_puts_every_slot_on_the_torch_dispatch_row() -> None:
    """TE's row map (its format, built on the CPU) with the padding added to each destination: the row TE's kernel
    writes with ``pad_offsets``, i.e. the torch dispatch's row; experts and counts are untouched."""
    index, weights = _routing()
    for align in (1, 16, 128):
        route = fused_routing(index, weights, 8, align, host_splits=False)
        assert route is not None
        plain = te_row_id_map_on_cpu(route.routing_map, 37, 8)
        padded = padded_row_id_map(plain, route.pad_offsets, 8)
        dispatch = make_dispatch(index, 8, align)
        assert padded.dtype == torch.int32 and torch.equal(padded[:, 8:], plain[:, 8:])
        for t in range(37):
            rows = {int(padded[t, j]): int(padded[t, 8 + j]) for j in range(int(padded[t, -1]))}
            want = {int(dispatch.slot_row[t * 2 + j]): int(index[t, j]) for j in range(2) if 0 <= index[t, j] < 8}
            assert rows == want


def test_zero_padding_rows_zeroes_exactly_the_rows_after_each_experts_tokens() -> None:
    """Triton (its interpreter on the CPU): rows ``bounds[e] + counts[e] .. bounds[e + 1]`` become zero, the others
    keep their values; empty experts, a tail longer than one tile (an upper-bound buffer's slack) and a width that
    is not a multiple of the column tile."""
    counts = torch.tensor([3, 0, 16, 1, 5])
    splits = torch.tensor([16, 0, 16, 16, 80])  # the last block: 5 tokens, 75 rows of padding and slack
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(splits, 0)])
    buffer = torch.randn(int(splits.sum()), 300)
    before = buffer.clone()
    assert zero_padding_rows(buffer, bounds, counts) is buffer
    padding = torch.zeros(len(buffer), dtype=torch.bool)
    for e in range(5):
        padding[int(bounds[e] + counts[e]):int(bounds[e + 1])] = True
    assert int(padding.sum()) == 128 - 25
    assert torch.equal(buffer[padding], torch.zeros(int(padding.sum()), 300))
    assert torch.equal(buffer[~padding], before[~padding])
    with pytest.raises(ValueError, match=r"contiguous \[rows, H\] buffer, E \+ 1 bounds and E counts"):
        zero_padding_rows(buffer, bounds[:-1], counts)
