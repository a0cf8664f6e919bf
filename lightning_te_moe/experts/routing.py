"""Token -> expert permutation with per-expert padding, and the weighted way back (torch; one host sync).

Every (token, slot) pair of the router's top-k goes to one row of an expert-sorted buffer in which every
expert's block is padded to ``align`` rows (FP8 grouped GEMMs need 16, MXFP8 32, NVFP4 128). Padding rows
read a zero row and get no routing weight, so they never reach the output or the gradients. Slots whose
expert id is out of range (expert-parallel sentinels) are dropped, as transformers does.

Both directions are gathers, forward and backward (no atomics: deterministic), and the routing weights are
applied inside the combine (one batched matmul) rather than as a separate pass over the rows. The bias adds
here (:func:`add_expert_bias`, :func:`routed_bias`) serve the torch backend and frozen expert weights with
trainable biases on the TE path (TE 2.20 drops those bias gradients); otherwise TE's GEMM epilogue adds the
biases and computes their gradients (measured faster on an H100: docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dispatch:
    """Where every slot goes. ``row_slot[r]``: the flat slot (token * k + j) padded row r holds, or
    ``num_slots`` for a padding row; ``slot_row[s]``: the padded row of slot s, or ``rows`` if dropped."""

    #: Padded rows per expert on the host, or None where they stay on the device (``host_splits=False``).
    splits: Optional[list[int]]
    rows: int
    dropped: bool
    num_tokens: int
    top_k: int
    row_slot: Tensor
    slot_row: Tensor
    row_expert: Tensor
    #: Cumulative padded row counts per expert (int32, on the device), as ``torch.nn.functional.grouped_mm`` wants.
    offsets: Tensor
    #: Padded rows per expert (int64, on the device), as TE's native grouped GEMM wants them.
    device_splits: Tensor

    @property
    def row_token(self) -> Tensor:
        """Token of each padded row (``num_tokens`` for padding rows)."""
        return torch.div(self.row_slot, self.top_k, rounding_mode="floor")


def make_dispatch(top_k_index: Tensor, num_experts: int, align: int = 1, host_splits: bool = True) -> Dispatch:
    """Sort the slots by expert and pad each expert's block to a multiple of ``align``.

    ``host_splits=True``: exact rows and the split sizes on the host (one host sync). ``host_splits=False``, for a
    grouped GEMM that reads its offsets on the device (``grouped_mm``): no host sync; the buffer has
    :func:`upper_bound_rows` rows and the slack rows, which no slot reads or writes, go to the last expert's block
    (``splits`` is then None).
    """
    num_tokens, top_k = top_k_index.shape
    num_slots = num_tokens * top_k
    device = top_k_index.device
    flat = top_k_index.reshape(-1).long()
    keys = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_keys, order = torch.sort(keys, stable=True)
    # Per-expert counts from the sorted keys (``bincount`` would sync with the host on CUDA), padded on the device.
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_experts + 1, device=device))
    counts = bounds.diff()
    padded = torch.div(counts + (align - 1), align, rounding_mode="floor") * align
    padded_starts = torch.cumsum(padded, 0) - padded
    splits: Optional[list[int]] = None
    if host_splits:
        counts_host: list[int] = counts.tolist()  # the one host sync: TE's split GEMMs need the sizes on the host
        splits = [-(-c // align) * align for c in counts_host]
        rows, kept = sum(splits), sum(counts_host)
        block_rows = padded
    else:
        rows = upper_bound_rows(num_tokens, top_k, num_experts, align, merges_repeats=False)
        kept = num_slots  # dropped slots too: they are sent to a spare row past the end, cut off below
        block_rows = torch.cat([padded[:-1], (rows - padded[:-1].sum()).view(1)])
    expert = sorted_keys[:kept]
    position = torch.arange(kept, device=device) - bounds[expert] + torch.cat([padded_starts, padded_starts.new_full(
        (1,), rows)])[expert]
    slots = order[:kept]
    if not host_splits:
        position = torch.where(expert < num_experts, position, rows)

    row_slot = torch.full((rows + 1,), num_slots, dtype=torch.long, device=device)
    row_slot[position] = slots
    row_slot = row_slot[:rows]
    slot_row = torch.full((num_slots,), rows, dtype=torch.long, device=device)
    slot_row[slots] = position
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=device), block_rows, output_size=rows)
    offsets = torch.cumsum(block_rows, 0).to(torch.int32)
    dropped = kept < num_slots if host_splits else True
    return Dispatch(splits, rows, dropped, num_tokens, top_k, row_slot, slot_row, row_expert, offsets,
                    block_rows.long())


def split_bounds(device_splits: Tensor) -> Tensor:
    """Where each expert's block of rows starts, and the end: ``E + 1`` values (int64, on the splits' device)."""
    return torch.cat([device_splits.new_zeros(1), torch.cumsum(device_splits, 0)]).long()


def upper_bound_rows(num_tokens: int, top_k: int, num_experts: int, align: int, merges_repeats: bool = True) -> int:
    """Most padded rows a routing can need, a multiple of ``align`` (so the slack keeps the last expert's block
    aligned): each token fills at most ``min(k, E)`` expert rows where a repeated expert merges into one row (TE's
    mask routing; ``k`` rows otherwise), and each expert's block pads by at most ``align - 1``."""
    per_token = min(top_k, num_experts) if merges_repeats else top_k
    bound = num_tokens * per_token + num_experts * (align - 1)
    return -(-bound // align) * align


def _rows(src: Tensor, index: Tensor, zero_row: bool = True) -> Tensor:
    """``src[index]`` where ``index == len(src)`` reads a zero row (``zero_row=False``: no index does)."""
    if zero_row:
        src = torch.cat([src, src.new_zeros(1, src.size(-1))])
    return src[index]


class _Permute(torch.autograd.Function):
    """Rows of the padded expert buffer from tokens; backward sums each token's k row gradients."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, dispatch: Dispatch) -> Tensor:
        ctx.dispatch = dispatch
        return _rows(hidden, dispatch.row_token)

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor, None]:
        d: Dispatch = ctx.dispatch
        return _rows(grad_rows, d.slot_row, d.dropped).view(d.num_tokens, d.top_k, -1).sum(dim=1), None


class _Combine(torch.autograd.Function):
    """``out[t] = sum_j weight[t, j] * rows[slot_row[t, j]]``: routing weights applied, slots summed."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, weights: Tensor, dispatch: Dispatch) -> Tensor:
        ctx.dispatch = dispatch
        ctx.save_for_backward(rows, weights)
        gathered = _rows(rows, dispatch.slot_row, dispatch.dropped).view(dispatch.num_tokens, dispatch.top_k, -1)
        return torch.bmm(weights.to(rows.dtype).unsqueeze(1), gathered).squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        d: Dispatch = ctx.dispatch
        rows, weights = ctx.saved_tensors
        row_weights = torch.cat([weights.reshape(-1), weights.new_zeros(1)])[d.row_slot].to(rows.dtype)
        grad_rows = _rows(grad_out.to(rows.dtype), d.row_token) * row_weights.unsqueeze(-1)
        gathered = _rows(rows, d.slot_row, d.dropped).view(d.num_tokens, d.top_k, -1)
        grad_weights = torch.bmm(gathered, grad_out.to(rows.dtype).unsqueeze(-1)).squeeze(-1)
        return grad_rows, grad_weights.to(weights.dtype), None


class _ExpertBias(torch.autograd.Function):
    """``rows + bias[row_expert]``, computed in place as ``rows += one_hot @ bias`` (one GEMM pass over ``rows``).

    The one-hot GEMM adds each row's own bias exactly (one product ``1 * b``, the rest ``0 * b``, accumulated and
    added to the row in fp32, rounded once: for finite biases the same value as ``rows + bias[row_expert]``)
    without materialising the gathered ``[rows, out]`` bias. ``rows`` must be a fresh GEMM output that nothing
    saved for backward (the caller's contract; autograd's version check would catch a violation). The bias
    gradient is the transposed GEMM ``one_hot.T @ grad`` (fp32 accumulation).
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, bias: Tensor, one_hot: Tensor) -> Tensor:
        ctx.save_for_backward(one_hot)
        ctx.bias_dtype = bias.dtype
        out = rows.detach()  # same storage: the add happens in place, the graph gets a new node
        return out.addmm_(one_hot, bias.to(rows.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Any, None]:
        if not ctx.needs_input_grad[1]:
            return grad, None, None
        (one_hot,) = ctx.saved_tensors
        return grad, (one_hot.t().to(grad.dtype) @ grad).to(ctx.bias_dtype), None


def add_expert_bias(rows: Tensor, bias: Tensor, dispatch: Dispatch) -> Tensor:
    """Each row plus its expert's bias (``bias [E, out]``). Overwrites ``rows``: pass a fresh GEMM output."""
    experts = torch.arange(bias.size(0), device=rows.device)
    one_hot = (dispatch.row_expert.unsqueeze(1) == experts).to(rows.dtype)
    return _ExpertBias.apply(rows, bias, one_hot)


def routed_bias(bias: Tensor, top_k_index: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """``sum_j weight[t, j] * bias[expert[t, j]]`` as one ``[T, E] @ [E, H]`` matmul.

    This is the down-projection bias under the original semantics (routing weight applied after the bias),
    split off the rows: ``sum_j w_j (y_j + b_j) = sum_j w_j y_j + sum_j w_j b_j``.
    """
    num_experts = bias.size(0)
    valid = (top_k_index >= 0) & (top_k_index < num_experts)
    dense = weights.new_zeros(weights.size(0), num_experts).scatter_add(
        1, top_k_index.clamp(0, num_experts - 1), weights * valid)
    return dense.to(dtype) @ bias.to(dtype)


def permute(hidden: Tensor, dispatch: Dispatch) -> Tensor:
    """``hidden [T, H]`` -> rows ``[rows, H]`` in padded expert order (zeros in padding)."""
    return _Permute.apply(hidden, dispatch)


def combine(rows_out: Tensor, weights: Tensor, dispatch: Dispatch) -> Tensor:
    """Expert outputs ``[rows, H]`` and routing weights ``[T, k]`` -> ``[T, H]``."""
    return _Combine.apply(rows_out, weights, dispatch)
