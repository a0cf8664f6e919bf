"""The Triton kernels of :mod:`.bias_glu` (imported only when they run: the package works without Triton).

Triton decides at import whether its kernels compile or run in its CPU interpreter (``TRITON_INTERPRET=1``, the
CPU tests): set it before this module is first imported.
"""

import triton
import triton.language as tl


@triton.jit
def program_share(bounds_ptr, bias_ptr, width, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """This program's expert, rows (its share of the expert's range: ``per_split`` tiles from ``first``, up to
    ``end``), columns of each half, and that expert's bias on those columns."""
    expert = tl.program_id(0)
    start = tl.load(bounds_ptr + expert)
    end = tl.load(bounds_ptr + expert + 1)
    per_split = ((end - start + BLOCK_R - 1) // BLOCK_R + SPLITS - 1) // SPLITS
    first = start + tl.program_id(1) * per_split * BLOCK_R
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_cols = cols < width
    bias_at = expert.to(tl.int64) * (2 * width) + cols
    bias_gate = tl.load(bias_ptr + bias_at, mask=in_cols, other=0.0).to(tl.float32)[None, :]
    bias_up = tl.load(bias_ptr + bias_at + width, mask=in_cols, other=0.0).to(tl.float32)[None, :]
    return end, per_split, first, cols, in_cols, bias_at, bias_gate, bias_up


@triton.jit
def bias_glu_fwd(h_ptr, bias_ptr, bounds_ptr, out_ptr, width, limit, alpha, offset,
                 CLAMP: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    end, per_split, first, cols, in_cols, bias_at, bias_gate, bias_up = program_share(
        bounds_ptr, bias_ptr, width, SPLITS, BLOCK_R, BLOCK_C)
    for tile in range(per_split):
        rows = first + tile * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & in_cols[None, :]
        at = rows[:, None] * (2 * width) + cols[None, :]
        gate = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32) + bias_gate
        up = tl.load(h_ptr + at + width, mask=mask, other=0.0).to(tl.float32) + bias_up
        if CLAMP:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        act = gate / (1.0 + tl.exp(-alpha * gate))  # TE: x * 1 / (1 + exp(-alpha x))
        out = (up + offset) * act
        tl.store(out_ptr + rows[:, None] * width + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_glu_bwd(grad_ptr, h_ptr, bias_ptr, bounds_ptr, dh_ptr, dbias_ptr, width, limit, alpha, offset,
                 CLAMP: tl.constexpr, DBIAS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    end, per_split, first, cols, in_cols, bias_at, bias_gate, bias_up = program_share(
        bounds_ptr, bias_ptr, width, SPLITS, BLOCK_R, BLOCK_C)
    sum_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_up = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(per_split):
        rows = first + tile * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & in_cols[None, :]
        at = rows[:, None] * (2 * width) + cols[None, :]
        dy = tl.load(grad_ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate_in = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32) + bias_gate
        up_in = tl.load(h_ptr + at + width, mask=mask, other=0.0).to(tl.float32) + bias_up
        gate = gate_in
        up = up_in
        if CLAMP:
            gate = tl.minimum(gate_in, limit)
            up = tl.minimum(tl.maximum(up_in, -limit), limit)
        sig = 1.0 / (1.0 + tl.exp(-alpha * gate))
        dgate = dy * (up + offset) * (sig + alpha * gate * sig * (1.0 - sig))
        dup = dy * gate * sig
        if CLAMP:
            dgate = tl.where(gate_in <= limit, dgate, 0.0)
            dup = tl.where((up_in >= -limit) & (up_in <= limit), dup, 0.0)
        tl.store(dh_ptr + at, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + at + width, dup.to(dh_ptr.dtype.element_ty), mask=mask)
        if DBIAS:
            sum_gate += tl.sum(dgate, axis=0)
            sum_up += tl.sum(dup, axis=0)
    if DBIAS:
        tl.atomic_add(dbias_ptr + bias_at, sum_gate, mask=in_cols, sem="relaxed")
        tl.atomic_add(dbias_ptr + bias_at + width, sum_up, mask=in_cols, sem="relaxed")
