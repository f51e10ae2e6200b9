"""The inner loop of a meta-attention tile: Q.K^T -> online softmax -> P.V over a span of KV tiles.

K/V rows come through the block table (paged cache) or by strides (dense tensors). Scores are in
the log2 domain (the caller folds scale * log2 e into one multiply), so softmax uses exp2.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs must not silently drop to tf32: callers asked for fp32 numbers. Accumulating
    # into `acc` in the MMA itself saves a second [M, D] fp32 tile of registers.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _kv_rows(bt_ptr, b, j, j_ok, stride_bt, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """(block, slot-in-block) of KV positions j; a dense tensor is one block per request (a
    scalar block: its offset is added once, not multiplied per position)."""
    if PAGED:
        blk = tl.load(bt_ptr + b * stride_bt + j // PAGE, mask=j_ok, other=0).to(tl.int64)
        return blk, (j % PAGE).to(tl.int64)
    else:
        return b.to(tl.int64), j.to(tl.int64)


@triton.jit
def _tile_rows(row_lo, row_hi, kv_head, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """(query token, query head, in range) of a tile's rows: row = token * GROUP + head in the group."""
    rows = row_lo + tl.arange(0, BLOCK_M)
    return rows // GROUP, kv_head * GROUP + rows % GROUP, rows < row_hi


@triton.jit
def _mask_scores(s, j, tok, head, b, q_row0, q_len, seq_len, kv_hi, pos_offset, row_ok,
                 tree_ptr, stride_tree, mask_ptr, stride_mb, stride_mh, stride_ms, stride_ml,
                 CAUSAL: tl.constexpr, HAS_TREE: tl.constexpr, MASK_KIND: tl.constexpr):
    """Apply the KV bound, causality (or the tree corner) and an explicit dense mask to a tile."""
    valid = (j[None, :] < kv_hi) & row_ok[:, None]
    if HAS_TREE:
        # only the q_len x q_len corner of new tokens is masked; the cached prefix is visible
        new = j[None, :] - (seq_len - q_len)
        in_corner = (new >= 0) & valid
        keep = tl.load(tree_ptr + (q_row0 + tok)[:, None].to(tl.int64) * stride_tree + new,
                       mask=in_corner, other=0)
        valid = valid & ((new < 0) | (keep != 0))
    elif CAUSAL:
        valid = valid & (j[None, :] <= (pos_offset + tok)[:, None])
    if MASK_KIND != 0:
        m_off = (b.to(tl.int64) * stride_mb + head[:, None].to(tl.int64) * stride_mh
                 + tok[:, None].to(tl.int64) * stride_ms + j[None, :].to(tl.int64) * stride_ml)
        m_val = tl.load(mask_ptr + m_off, mask=valid, other=0)
        if MASK_KIND == 1:
            valid = valid & (m_val != 0)
        else:
            # clamp so HF's finfo.min stays finite after the log2 e scaling (all-masked rows of
            # finfo.min then stay uniform, as in SDPA)
            s = s + tl.maximum(m_val.to(tl.float32), -1.0e30) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _kv_span(acc, m_i, l_i, q, k_ptr, v_ptr, bt_ptr, pages, p0, b, lo, hi, kv_head, d, dv,
             row_lo, row_hi, q_row0, q_len, seq_len, kv_hi, pos_offset, GROUP: tl.constexpr, scale_log2,
             stride_bt, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
             tree_ptr, stride_tree, mask_ptr, stride_mb, stride_mh, stride_ms, stride_ml,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
             PAGED: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_TREE: tl.constexpr, MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
             GATHER: tl.constexpr):
    """KV tiles [lo, hi), one basic block each: scores, online-softmax update, P.V accumulation.

    Returns the running (acc, m, l) and row_lo: callers rebuild the row vectors from this copy
    after the loop. At 4 warps and 128 rows that is 83 -> 26 spill instructions per KV tile; at 8
    warps (no spills either way) an H100 prefill of 4 x 2048 went from 409 to 366 us.
    """
    for start in range(lo, hi, BLOCK_N):
        # a loop-carried copy of row_lo: the row vectors built from it after the loop are then not
        # merged with the ones built before it, so they do not stay live across the KV loop
        row_lo = tl.maximum(row_lo, 0)
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_hi
        if GATHER:
            # block ids from the chunk's slice of the block table (no load in the loop), as one
            # int32 cache row: a 64-bit multiply fewer per address (H200 prefill 492 -> 464 us);
            # the launcher checks that a block is PAGE rows of the cache
            row = (tl.gather(pages, j // PAGE - p0, 0) * PAGE + j % PAGE).to(tl.int64)
            k_off = row * stride_ks + kv_head * stride_kh  # [BLOCK_N]
            v_off = row * stride_vs + kv_head * stride_vh  # [BLOCK_N]
        else:
            blk, slot = _kv_rows(bt_ptr, b, j, j_ok, stride_bt, PAGED, PAGE)
            k_off = blk * stride_kb + slot * stride_ks + kv_head * stride_kh  # [BLOCK_N]
            v_off = blk * stride_vb + slot * stride_vs + kv_head * stride_vh  # [BLOCK_N]
        k_mask = (d < HEAD_DIM)[:, None]
        v_mask = (dv < HEAD_DIM_V)[None, :]
        if MASKED:
            k_mask = k_mask & j_ok[None, :]
            v_mask = v_mask & j_ok[:, None]
        k_t = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=k_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
        s = _mma(q, k_t, tl.zeros([q.shape[0], BLOCK_N], tl.float32), IEEE)
        if MASKED:
            tok, head, row_ok = _tile_rows(row_lo, row_hi, kv_head, q.shape[0], GROUP)
            s = _mask_scores(s * scale_log2, j, tok, head, b, q_row0, q_len, seq_len, kv_hi, pos_offset, row_ok,
                             tree_ptr, stride_tree, mask_ptr, stride_mb, stride_mh, stride_ms, stride_ml,
                             CAUSAL, HAS_TREE, MASK_KIND)
        if MASKED:  # a row with nothing visible yet keeps m = -inf; exp2 needs a finite pivot
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_new_safe[:, None])
        else:
            # scale > 0 (the launchers check): max(s) * scale is the max of the scaled scores,
            # and the scaling folds into the exponent's FMA
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
            m_new_safe = m_new
            p = tl.math.exp2(s * scale_log2 - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + v_off[:, None] + dv[None, :], mask=v_mask, other=0.0)  # [BLOCK_N, BLOCK_DV]
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, m_i, l_i, row_lo


@triton.jit
def _kv_spans(acc, m_i, l_i, q, k_ptr, v_ptr, bt_ptr, pages, p0, b, lo, full, hi, kv_head, d, dv,
              row_lo, row_hi, q_row0, q_len, seq_len, kv_hi, pos_offset, GROUP: tl.constexpr, scale_log2,
              stride_bt, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
              tree_ptr, stride_tree, mask_ptr, stride_mb, stride_mh, stride_ms, stride_ml,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              PAGED: tl.constexpr, PAGE: tl.constexpr, ALL_MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_TREE: tl.constexpr, MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
              GATHER: tl.constexpr):
    """Tiles [lo, full) without masks, then [full, hi) masked; ALL_MASKED: one masked loop over [lo, hi)."""
    if not ALL_MASKED:
        acc, m_i, l_i, row_lo = _kv_span(
            acc, m_i, l_i, q, k_ptr, v_ptr, bt_ptr, pages, p0, b, lo, full, kv_head, d, dv, row_lo, row_hi, q_row0,
            q_len, seq_len, kv_hi, pos_offset, GROUP, scale_log2, stride_bt, stride_kb, stride_ks, stride_kh,
            stride_vb, stride_vs, stride_vh, tree_ptr, stride_tree, mask_ptr, stride_mb, stride_mh, stride_ms,
            stride_ml, BLOCK_N, HEAD_DIM, HEAD_DIM_V, PAGED, PAGE, False, CAUSAL, HAS_TREE, MASK_KIND, DOT_FP32, IEEE,
            GATHER)
        lo = full
    return _kv_span(acc, m_i, l_i, q, k_ptr, v_ptr, bt_ptr, pages, p0, b, lo, hi, kv_head, d, dv,
                    row_lo, row_hi, q_row0, q_len, seq_len, kv_hi, pos_offset, GROUP, scale_log2,
                    stride_bt, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    tree_ptr, stride_tree, mask_ptr, stride_mb, stride_mh, stride_ms, stride_ml,
                    BLOCK_N, HEAD_DIM, HEAD_DIM_V, PAGED, PAGE, True, CAUSAL, HAS_TREE,
                    MASK_KIND, DOT_FP32, IEEE, GATHER)
