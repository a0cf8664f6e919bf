"""The Triton kernel of :func:`~.te_routing.zero_padding_rows` (imported only when it runs: the package works without
Triton). Set ``TRITON_INTERPRET=1`` before the first import to run it in Triton's CPU interpreter (the CPU tests)."""

import triton
import triton.language as tl


@triton.jit
def zero_padding_rows_kernel(out_ptr, bounds_ptr, counts_ptr, width, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program ``(e, c)``: zeros rows ``bounds[e] + counts[e] .. bounds[e + 1]`` (the padding after expert ``e``'s
    tokens) on column block ``c`` of the row-major ``[rows, width]`` buffer."""
    expert = tl.program_id(0)
    start = tl.load(bounds_ptr + expert) + tl.load(counts_ptr + expert)
    end = tl.load(bounds_ptr + expert + 1)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    zeros = tl.zeros([BLOCK_R, BLOCK_C], dtype=out_ptr.dtype.element_ty)
    for first in range(start, end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & (cols < width)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :], zeros, mask=mask)
