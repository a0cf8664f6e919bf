"""TE's fused token permutation for the CUDA path: ``moe_permute`` (with padding) and ``moe_unpermute`` (weighted).

The torch path (:mod:`.routing`) moves tokens with gathers and applies the routing weights in a batched matmul:
about ten passes over the ``[rows, H]`` buffers per step. TE's Triton kernels do each direction in one pass:
the permute writes each token to its k expert rows, with every expert's block padded to the recipe's alignment
(padding rows zeroed, so they reach neither the output nor a weight gradient); the unpermute reads them back,
multiplies by the routing weights and sums in fp32; the backwards are single kernels as well, and the
routing-weight gradient comes out of the unpermute's backward. One host sync per layer, for the split sizes
TE's ``GroupedLinear`` needs on the host.

TE's mask routing map holds one bit per (token, expert), so a token that names one expert twice cannot be
expressed: :func:`fused_routing` then returns None and the caller uses the torch path (transformers' top-k never
repeats an expert). Out-of-range expert ids (expert-parallel sentinels) are dropped, as on the torch path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from .gemm import te_available


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

    Out-of-range ids land in an extra column that is cut off. The probabilities are differentiable: their
    gradient flows back to ``weights`` (zero for dropped slots).
    """
    num_tokens = index.size(0)
    cols = torch.where((index >= 0) & (index < num_experts), index, num_experts).long()
    mask = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(1, cols, True)
    probs = torch.zeros(num_tokens, num_experts + 1, dtype=torch.float32, device=index.device)
    probs = probs.scatter(1, cols, weights.float())
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

    def __init__(self, routing_map: Tensor, probs: Tensor, splits: list[int], device_splits: Tensor,
                 offsets: Optional[Tensor]) -> None:
        self.routing_map = routing_map
        self.probs = probs
        #: Padded rows per expert (host ints: TE's split GEMM path reads them on the host).
        self.splits = splits
        #: The same on the device (TE's native grouped GEMM reads them there).
        self.device_splits = device_splits
        self.rows = sum(splits)
        self.pad_offsets = offsets
        self._row_id_map: Optional[Tensor] = None

    def permute(self, hidden: Tensor) -> Tensor:
        """``hidden [T, H]`` -> ``[rows, H]`` in padded expert order."""
        rows, self._row_id_map, _ = torch.ops.te_moe.permute_mask_map_fwd(
            hidden, self.routing_map, self.rows, None, self.pad_offsets)
        return rows

    def combine(self, rows: Tensor) -> Tensor:
        """Expert outputs ``[rows, H]`` -> ``[T, H]``: each token's rows times its routing weights, summed."""
        from transformer_engine.pytorch import moe_unpermute

        if self._row_id_map is None:
            raise RuntimeError("FusedRouting.combine called before permute")
        return moe_unpermute(rows, self._row_id_map, merging_probs=self.probs,
                             restore_shape=(self.routing_map.size(0), rows.size(1)), pad_offsets=self.pad_offsets)


def fused_routing(index: Tensor, weights: Tensor, num_experts: int, align: int) -> Optional[FusedRouting]:
    """The fused dispatch for this routing, or None where TE's mask map cannot express it (see module doc)."""
    routing_map, probs = routing_map_and_probs(index, weights, num_experts)
    counts = routing_map.sum(dim=0)
    valid = ((index >= 0) & (index < num_experts)).sum().view(1)
    host: list[int] = torch.cat([counts, valid]).tolist()  # the one host sync
    counts_host, slots = host[:-1], host[-1]
    if sum(counts_host) != slots or slots == 0:  # a repeated expert in one token's top-k, or nothing to compute
        return None
    splits = [-(-c // align) * align for c in counts_host]
    offsets = pad_offsets(counts, align) if splits != counts_host else None
    return FusedRouting(routing_map, probs, splits, padded_counts(counts, align), offsets)
