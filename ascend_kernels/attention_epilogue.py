"""Epilogues of the meta-attention kernel: normalised stores, the split-KV merge, padded rows."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store_rows(o_ptr, o_base, acc, l_i, tok, head, dv, row_ok, stride_ot, stride_oh, HEAD_DIM_V: tl.constexpr):
    # rows that saw nothing (fully masked) are 0, as SDPA returns them
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    ptrs = o_ptr + o_base + tok[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + dv[None, :]
    tl.store(ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv < HEAD_DIM_V)[None, :])


@triton.jit
def _merge_pieces(part_ptr, ml_ptr, count_ptr, acc, m_i, l_i, part_base, split, num_splits,
                  o_ptr, o_base, tok, head, dv, row_ok, stride_ot, stride_oh,
                  BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """Split-KV: publish this piece; the last piece to arrive merges all and stores the rows."""
    r = tl.arange(0, BLOCK_M)
    slot = (part_base + split).to(tl.int64)
    # only the tile's real rows travel through the workspace (a decode tile of a GQA group of 4
    # fills 4 of 16 rows); the merge reads the same rows back
    part_mask = row_ok[:, None] & (dv < HEAD_DIM_V)[None, :]
    tl.store(part_ptr + slot * BLOCK_M * BLOCK_DV + r[:, None] * BLOCK_DV + dv[None, :], acc, mask=part_mask)
    tl.store(ml_ptr + slot * 2 * BLOCK_M + r, m_i, mask=row_ok)
    tl.store(ml_ptr + slot * 2 * BLOCK_M + BLOCK_M + r, l_i, mask=row_ok)
    tl.debug_barrier()  # every thread's partial stores precede the release below
    arrived = tl.atomic_add(count_ptr + part_base, 1, sem="acq_rel")
    if arrived == num_splits - 1:
        m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_all = tl.zeros([BLOCK_M], tl.float32)
        acc_all = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for i in range(0, num_splits):
            piece = (part_base + i).to(tl.int64)
            m_p = tl.load(ml_ptr + piece * 2 * BLOCK_M + r, mask=row_ok, other=0.0, volatile=True)
            l_p = tl.load(ml_ptr + piece * 2 * BLOCK_M + BLOCK_M + r, mask=row_ok, other=0.0, volatile=True)
            acc_p = tl.load(part_ptr + piece * BLOCK_M * BLOCK_DV + r[:, None] * BLOCK_DV + dv[None, :],
                            mask=part_mask, other=0.0, volatile=True)
            m_new = tl.maximum(m_all, m_p)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a_old = tl.math.exp2(m_all - m_safe)
            a_new = tl.math.exp2(m_p - m_safe)
            l_all = l_all * a_old + l_p * a_new
            acc_all = acc_all * a_old[:, None] + acc_p * a_new[:, None]
            m_all = m_new
        _store_rows(o_ptr, o_base, acc_all, l_all, tok, head, dv, row_ok, stride_ot, stride_oh, HEAD_DIM_V)
        tl.atomic_xchg(count_ptr + part_base, 0)  # leave the counter ready for the next launch


@triton.jit
def _zero_tail_rows(o_ptr, tail_row, num_rows, stride_ot, stride_oh,
                    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """Packed rows past the last request (a padded bucket) get zeros, as the reference does."""
    h = tl.arange(0, BLOCK_H)
    dv = tl.arange(0, BLOCK_DV)
    zeros = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32).to(o_ptr.dtype.element_ty)
    first = tail_row + tl.program_id(0)  # tail_row: cu_seqlens_q[num_requests], loaded up front
    row_ptr = o_ptr + first.to(tl.int64) * stride_ot  # advanced by pointer: loop vars may be ints
    for _ in range(first, num_rows, tl.num_programs(0)):
        tl.store(row_ptr + h[:, None] * stride_oh + dv[None, :], zeros,
                 mask=(h < NUM_HEADS)[:, None] & (dv < HEAD_DIM_V)[None, :])
        row_ptr += tl.num_programs(0) * stride_ot
