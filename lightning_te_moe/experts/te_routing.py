"""TE's fused token permutation for the CUDA path: ``moe_permute`` (with padding) and ``moe_unpermute`` (weighted).

The torch path (:mod:`.routing`) moves tokens with gathers and applies the routing weights in a batched matmul:
about ten passes over the ``[rows, H]`` buffers per step. TE's Triton kernels do each direction in one pass:
the permute writes each token to its k expert rows, with every expert's block padded to the recipe's alignment
(padding rows zeroed, so they reach neither the output nor a weight gradient); the unpermute reads them back,
multiplies by the routing weights and sums in fp32; the backwards are single kernels as well, and the
routing-weight gradient comes out of the unpermute's backward.

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

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from .gemm import te_available
from .routing import upper_bound_rows


@lru_cache(maxsize=1)
def fused_permutation_available() -> bool:
    """TE imports and registers its mask-map permutation ops (TE 2.x with Triton)."""
    if not te_available():
        return False
    try:
        import transformer_engine.pytorch.permutation  # noqa: F401  (registers torch.ops.te_moe.*)

        return hasattr(torch.ops.te_moe, "permute_mask_map_fwd")
    except (ImportError, RuntimeError, AttributeError):
        return False


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
                 device_splits: Tensor, offsets: Optional[Tensor]) -> None:
        self.routing_map = routing_map
        self.probs = probs
        #: Rows of the permuted buffer (the exact padded total, or the host-side upper bound).
        self.rows = rows
        #: Padded rows per expert as host ints (TE's split GEMM path), or None where they stay on the device.
        self.splits = splits
        #: Rows per expert on the device, summing to ``rows`` (TE's native grouped GEMM reads them there).
        self.device_splits = device_splits
        self.pad_offsets = offsets
        self._row_id_map: Optional[Tensor] = None

    @property
    def offsets(self) -> Tensor:
        """Cumulative rows per expert (int32, on the device), as ``torch.nn.functional.grouped_mm`` wants them."""
        return torch.cumsum(self.device_splits, 0).to(torch.int32)

    def permute(self, hidden: Tensor) -> Tensor:
        """``hidden [T, H]`` -> ``[rows, H]`` in padded expert order."""
        rows, self._row_id_map = te_permute(hidden, self.routing_map, self.rows, self.pad_offsets)
        return rows

    def combine(self, rows: Tensor) -> Tensor:
        """Expert outputs ``[rows, H]`` -> ``[T, H]``: each token's rows times its routing weights, summed."""
        if self._row_id_map is None:
            raise RuntimeError("FusedRouting.combine called before permute")
        return te_unpermute(rows, self._row_id_map, self.probs, self.routing_map.size(0), self.pad_offsets)


def te_permute(hidden: Tensor, routing_map: Tensor, rows: int, pad_offsets: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """TE's permute kernel: ``(rows [rows, H], row_id_map)``; with ``pad_offsets`` every unwritten row is zero."""
    permuted, row_id_map, _ = torch.ops.te_moe.permute_mask_map_fwd(hidden, routing_map, rows, None, pad_offsets)
    return permuted, row_id_map


def te_unpermute(rows: Tensor, row_id_map: Tensor, probs: Tensor, num_tokens: int,
                 pad_offsets: Optional[Tensor]) -> Tensor:
    """TE's weighted unpermute (fp32 sum); its backward zero-fills the rows no token reads where ``pad_offsets``."""
    from transformer_engine.pytorch import moe_unpermute

    return moe_unpermute(rows, row_id_map, merging_probs=probs, restore_shape=(num_tokens, rows.size(1)),
                         pad_offsets=pad_offsets)


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
        return FusedRouting(routing_map, probs, sum(splits), splits, padded, offsets)
    rows = upper_bound_rows(index.size(0), index.size(1), num_experts, align)
    device_splits = torch.cat([padded[:-1], (rows - padded[:-1].sum()).view(1)])
    # Offsets always given (zeros where nothing is padded): TE then zero-fills the buffer, slack rows included.
    return FusedRouting(routing_map, probs, rows, None, device_splits, pad_offsets(counts, align))
