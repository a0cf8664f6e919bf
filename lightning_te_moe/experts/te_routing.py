"""TE's fused token permutation for the CUDA path: TE's permute kernel (padded) and ``moe_unpermute`` (weighted).

The torch path (:mod:`.routing`) moves tokens with gathers and applies the routing weights in a batched matmul:
about ten passes over the ``[rows, H]`` buffers per step. TE's Triton kernels do each direction in one pass:
the permute writes each token to its k expert rows, with every expert's block padded to the recipe's alignment
(padding rows zeroed, so they reach neither the output nor a weight gradient); the unpermute reads them back,
multiplies by the routing weights and sums in fp32; the backwards are single kernels as well, and the
routing-weight gradient comes out of the unpermute's backward.

Padding rows: TE's kernels place padded rows themselves when given ``pad_offsets``, but then allocate both
``[rows, H]`` buffers that have padding (the permuted rows, and the gradient its unpermute's backward writes) with
``torch.zeros``: two full passes of writes (0.38 GB each for GPT-OSS-20B at 16,384 tokens) to zero what is mostly
overwritten. Here the destinations in TE's row map already include the padding (:func:`padded_row_id_map`), TE's
kernels run without ``pad_offsets`` (``torch.empty``), and only the padding rows are zeroed
(:func:`zero_padding_rows`). This calls TE's Triton permutation wrappers (``transformer_engine.pytorch.triton``,
TE internals: only here) for the permute; the unpermute is TE's public ``moe_unpermute``.

Split sizes: TE's split GEMM path needs them on the host, which costs one host sync per layer
(``host_splits=True``). TE's native grouped GEMM reads them on the device; for it (``host_splits=False``) the
permutation buffer is sized by an upper bound known on the host (``T * min(k, E) + E * (align - 1)`` rows,
rounded up to ``align``) and the slack rows, zeroed like every padding row, are appended to the last expert's
block, so the layer makes no host sync at all: zero rows reach neither the output (no token reads them back)
nor a gradient (their output gradient is zero).

TE's mask routing map holds one bit per (token, expert), so a token that names one expert twice gets one row
with the sum of its routing weights: ``(w1 + w2) * f(x) = w1 * f(x) + w2 * f(x)``, the same function and
gradients (transformers' top-k never repeats an expert). Out-of-range expert ids (expert-parallel sentinels) are
dropped, as on the torch path.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Any, Optional

import torch
from torch import Tensor

from .gemm import te_available
from .routing import split_bounds, upper_bound_rows


#: TE's Triton permutation wrappers this module calls (TE internals, in ``transformer_engine.pytorch.triton``).
_TE_WRAPPERS = ("make_row_id_map", "permute_with_mask_map", "unpermute_with_mask_map")


@lru_cache(maxsize=1)
def fused_permutation_available() -> bool:
    """TE imports and registers its mask-map unpermute op, and has the Triton wrappers (TE 2.x with Triton)."""
    if not te_available():
        return False
    try:
        import transformer_engine.pytorch.permutation  # noqa: F401  (registers torch.ops.te_moe.*)

        wrappers = _te_permutation()
        return (hasattr(torch.ops.te_moe, "unpermute_mask_map_fwd")
                and all(callable(getattr(wrappers, name, None)) for name in _TE_WRAPPERS))
    except (ImportError, RuntimeError, AttributeError):
        return False


def _te_permutation() -> Any:
    from transformer_engine.pytorch.triton import permutation

    return permutation


def routing_map_and_probs(index: Tensor, weights: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``index [T, k]``, ``weights [T, k]`` -> bool ``[T, E]`` map and fp32 ``[T, E]`` routing weights.

    Out-of-range ids land in an extra column that is cut off; a repeated expert's weights add up. The
    probabilities are differentiable: their gradient flows back to ``weights`` (zero for dropped slots).
    """
    num_tokens = index.size(0)
    cols = torch.where((index >= 0) & (index < num_experts), index, num_experts).long()
    mask = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(1, cols, True)
    probs = torch.zeros(num_tokens, num_experts + 1, dtype=torch.float32, device=index.device)
    probs = probs.scatter_add(1, cols, weights.float())
    return mask[:, :num_experts].contiguous(), probs[:, :num_experts].contiguous()


def padded_counts(counts: Tensor, align: int) -> Tensor:
    """``ceil(c / align) * align`` per expert (int64, on the counts' device)."""
    return ((counts + (align - 1)) // align * align).long()


def pad_offsets(counts: Tensor, align: int) -> Tensor:
    """Rows of padding before each expert's block (exclusive cumsum of ``ceil(c / align) * align - c``)."""
    pad = padded_counts(counts, align) - counts
    return (torch.cumsum(pad, 0) - pad).long()


class FusedRouting:
    """One layer's dispatch through TE's kernels: :meth:`permute` then, after the GEMMs, :meth:`combine`."""

    def __init__(self, routing_map: Tensor, probs: Tensor, rows: int, splits: Optional[list[int]],
                 device_splits: Tensor, offsets: Optional[Tensor], counts: Tensor) -> None:
        self.routing_map = routing_map
        self.probs = probs
        #: Rows of the permuted buffer (the exact padded total, or the host-side upper bound).
        self.rows = rows
        #: Padded rows per expert as host ints (TE's split GEMM path), or None where they stay on the device.
        self.splits = splits
        #: Rows per expert on the device, summing to ``rows`` (TE's native grouped GEMM reads them there).
        self.device_splits = device_splits
        self.pad_offsets = offsets
        #: Tokens per expert (on the device): the rows of each block that are not padding.
        self.counts = counts
        self._row_id_map: Optional[Tensor] = None

    @cached_property
    def offsets(self) -> Tensor:
        """Cumulative rows per expert (int32, on the device), as ``torch.nn.functional.grouped_mm`` wants them."""
        return torch.cumsum(self.device_splits, 0).to(torch.int32)

    @cached_property
    def bounds(self) -> Tensor:
        """Where each expert's block starts, and the end (``E + 1`` values, int64, on the device)."""
        return split_bounds(self.device_splits)

    def permute(self, hidden: Tensor) -> Tensor:
        """``hidden [T, H]`` -> ``[rows, H]`` in padded expert order, padding rows zero."""
        num_experts = self.routing_map.size(1)
        row_id_map = te_row_id_map(self.routing_map, hidden.size(0), num_experts)
        if self.pad_offsets is not None:
            row_id_map = padded_row_id_map(row_id_map, self.pad_offsets, num_experts)
        self._row_id_map = row_id_map
        padding = (self.bounds, self.counts) if self.pad_offsets is not None else None
        return _Permute.apply(hidden, row_id_map, self.rows, num_experts, padding)

    def combine(self, rows: Tensor) -> Tensor:
        """Expert outputs ``[rows, H]`` -> ``[T, H]``: each token's rows times its routing weights, summed (fp32);
        the gradient of the padding rows, which no token reads, is zero."""
        if self._row_id_map is None:
            raise RuntimeError("FusedRouting.combine called before permute")
        if self.pad_offsets is not None:
            rows = _ZeroPaddingGrad.apply(rows, self.bounds, self.counts)
        return te_unpermute(rows, self._row_id_map, self.probs, self.routing_map.size(0))


def te_row_id_map(routing_map: Tensor, num_tokens: int, num_experts: int) -> Tensor:
    """TE's ``make_row_id_map``: ``[T, 2E + 1]`` int32, each token's destination rows (experts in order, tokens in
    order within an expert, no padding), then those rows' experts, then how many."""
    return _te_permutation().make_row_id_map(routing_map, num_tokens, num_experts)


def te_permute(hidden: Tensor, row_id_map: Tensor, num_experts: int, rows: int) -> Tensor:
    """TE's permute kernel: each token copied to its destination rows of a new, uninitialised ``[rows, H]`` buffer
    (rows no token names keep whatever the memory held)."""
    num_tokens, hidden_size = hidden.shape
    out, _, _ = _te_permutation().permute_with_mask_map(hidden, row_id_map, None, None, None, num_tokens,
                                                        num_experts, rows, hidden_size, None)
    return out


def te_gather(rows: Tensor, row_id_map: Tensor, num_experts: int, num_tokens: int) -> Tensor:
    """TE's unpermute kernel without weights: ``[T, H]``, each token's rows summed (the permute's gradient)."""
    out, _ = _te_permutation().unpermute_with_mask_map(rows, row_id_map, None, None, None, num_tokens, num_experts,
                                                       rows.size(1))
    return out


def te_unpermute(rows: Tensor, row_id_map: Tensor, probs: Tensor, num_tokens: int) -> Tensor:
    """TE's public weighted unpermute (fp32 sum, differentiable in ``rows`` and ``probs``); its backward leaves the
    rows no token reads uninitialised (no ``pad_offsets``)."""
    from transformer_engine.pytorch import moe_unpermute

    return moe_unpermute(rows, row_id_map, merging_probs=probs, restore_shape=(num_tokens, rows.size(1)))


def padded_row_id_map(row_id_map: Tensor, pad_offsets: Tensor, num_experts: int) -> Tensor:
    """TE's mask-map ``row_id_map`` (``[T, 2E + 1]``: each token's destination rows, then their experts, then how
    many; TE's ``make_row_id_map``) with every destination moved past the padding before its expert: TE's kernels
    given this map and no ``pad_offsets`` put every row where they would put it with ``pad_offsets``."""
    dest, experts, routed = row_id_map.split([num_experts, num_experts, 1], dim=1)
    used = torch.arange(num_experts, device=row_id_map.device) < routed  # entries past n_routed are unset
    shift = pad_offsets.to(torch.int32)[experts.clamp(0, num_experts - 1).long()]
    return torch.cat([dest + torch.where(used, shift, 0), experts, routed], dim=1)


#: Rows and columns of a :func:`zero_padding_rows` tile.
_ZERO_BLOCK_ROWS = 16
_ZERO_BLOCK_COLS = 256


def zero_padding_rows(buffer: Tensor, bounds: Tensor, counts: Tensor) -> Tensor:
    """Zero, in place, rows ``bounds[e] + counts[e] .. bounds[e + 1]`` of ``buffer [rows, H]`` for every expert ``e``:
    the rows after each expert's tokens (padding, and the slack of an upper-bound buffer). One Triton kernel, no host
    sync; it writes only those rows."""
    if buffer.dim() != 2 or not buffer.is_contiguous() or bounds.numel() != counts.numel() + 1:
        raise ValueError(f"zero_padding_rows takes a contiguous [rows, H] buffer, E + 1 bounds and E counts; got "
                         f"{tuple(buffer.shape)} (contiguous: {buffer.is_contiguous()}), {bounds.numel()} bounds, "
                         f"{counts.numel()} counts")
    if buffer.numel() and counts.numel():
        from .padding_triton import zero_padding_rows_kernel

        grid = (counts.numel(), -(-buffer.size(1) // _ZERO_BLOCK_COLS))
        zero_padding_rows_kernel[grid](buffer, bounds.long(), counts.long(), buffer.size(1),
                                       BLOCK_R=_ZERO_BLOCK_ROWS, BLOCK_C=_ZERO_BLOCK_COLS)
    return buffer


class _Permute(torch.autograd.Function):
    """:func:`te_permute`, then the padding rows zeroed (``padding``: bounds and counts, or None where nothing is
    padded); backward: :func:`te_gather`, which reads only the tokens' rows."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, row_id_map: Tensor, rows: int, num_experts: int,
                padding: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        out = te_permute(hidden.contiguous(), row_id_map, num_experts, rows)
        if padding is not None:
            zero_padding_rows(out, *padding)
        ctx.save_for_backward(row_id_map)
        ctx.dims = num_experts, hidden.size(0)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        (row_id_map,) = ctx.saved_tensors
        return te_gather(grad.contiguous(), row_id_map, *ctx.dims), None, None, None, None


class _ZeroPaddingGrad(torch.autograd.Function):
    """Identity forward; backward zeros the gradient's padding rows in place (TE's unpermute backward, run without
    ``pad_offsets``, leaves them uninitialised: they must not reach a weight gradient)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, bounds: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(bounds, counts)
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        bounds, counts = ctx.saved_tensors
        return zero_padding_rows(grad.contiguous(), bounds, counts), None, None


def fused_routing(index: Tensor, weights: Tensor, num_experts: int, align: int,
                  host_splits: bool = True) -> Optional[FusedRouting]:
    """The fused dispatch for this routing (see module doc). ``host_splits=True``: exact rows and host split
    sizes (one host sync), None when no slot is routed; ``host_splits=False``: no host sync (upper-bound rows)."""
    routing_map, probs = routing_map_and_probs(index, weights, num_experts)
    counts = routing_map.sum(dim=0)
    padded = padded_counts(counts, align)
    if host_splits:
        counts_host: list[int] = counts.tolist()  # the one host sync
        if not any(counts_host):
            return None
        splits = [-(-c // align) * align for c in counts_host]
        offsets = pad_offsets(counts, align) if splits != counts_host else None
        return FusedRouting(routing_map, probs, sum(splits), splits, padded, offsets, counts)
    rows = upper_bound_rows(index.size(0), index.size(1), num_experts, align)
    device_splits = torch.cat([padded[:-1], (rows - padded[:-1].sum()).view(1)])
    # Offsets always given (zeros where nothing is padded): the padding rows, slack rows included, are zeroed.
    return FusedRouting(routing_map, probs, rows, None, device_splits, pad_offsets(counts, align), counts)
