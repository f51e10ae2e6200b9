"""The meta-attention Triton kernel: one persistent launch walks a Task-Table.

Every task is the same basic block looped over KV tiles: Q.K^T -> online softmax -> P.V, for one
tile of query rows (token x query head of one GQA group) against one kv head. Two tile heights
are compiled into the same kernel (a small one for decode / short verify, a large one for
prefill); the task says which one runs. KV is read through a block table (paged cache) or by
strides (dense SDPA tensors: PAGED=False). Split-KV pieces write partial results to a workspace
and the last piece to finish merges them, so even split batches stay one launch.

Scores live in the log2 domain (scale * log2 e folded into one multiply) so softmax uses exp2.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ascend_kernels.attention_epilogue import _merge_pieces, _store_rows, _zero_tail_rows
from ascend_kernels.attention_kv_span import _kv_spans, _tile_rows
from ascend_kernels.tiling import F_DECODE_REQUESTS, HEADER, PATH_SMALL, TASK_FIELDS

LOG2E = 1.4426950408889634
# module globals read inside @triton.jit must be constexpr objects
TABLE_HEADER = tl.constexpr(HEADER)
DECODE_FIELD = tl.constexpr(F_DECODE_REQUESTS)
FIELDS = tl.constexpr(TASK_FIELDS)
SMALL_PATH = tl.constexpr(PATH_SMALL)


@triton.jit
def _chunk_pages(bt_ptr, b, c0, kv_hi, stride_bt, PAGE: tl.constexpr, CHUNK_PAGES: tl.constexpr):
    """The block ids of a KV chunk starting at c0 (one read; the tiles gather from them)."""
    p0 = c0 // PAGE
    pg = p0 + tl.arange(0, CHUNK_PAGES)
    return tl.load(bt_ptr + b * stride_bt + pg, mask=pg < (kv_hi + PAGE - 1) // PAGE, other=0), p0  # [CHUNK_PAGES]


@triton.jit
def _pair_kv(seq_ptr, bt_ptr, b, ok, bt_width, stride_bt, CHUNK_PAGES: tl.constexpr):
    """(KV length, first CHUNK_PAGES block ids) of request b of a decode batch; nothing is read
    unless `ok`, and no block id past the table's width."""
    seq_len = tl.load(seq_ptr + b, mask=ok, other=0)
    pg = tl.arange(0, CHUNK_PAGES)
    return seq_len, tl.load(bt_ptr + b * stride_bt + pg, mask=pg < tl.where(ok, bt_width, 0), other=0)


@triton.jit
def _attend_tile(q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, tree_ptr, mask_ptr, part_ptr, ml_ptr, count_ptr,
                 b, row_lo, row_hi, kv_head, kv_lo, kv_hi, part_base, split, num_splits,
                 q_base, o_base, q_row0, q_len, seq_len, pos_offset, scale_log2,
                 stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 stride_tree, stride_mb, stride_mh, stride_ms, stride_ml,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, GROUP: tl.constexpr,
                 PAGED: tl.constexpr, PAGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_TREE: tl.constexpr,
                 MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, SMALL: tl.constexpr,
                 KV_CHUNK: tl.constexpr, CHUNK_PAGES: tl.constexpr, first_pages, FIRST_PAGES: tl.constexpr):
    # SMALL: the decode / short-verify path. Its tasks may be split-KV pieces, and it masks every
    # KV tile in one loop. KV_CHUNK > 0 (paged): block-table reads per chunk of KV_CHUNK positions.
    # FIRST_PAGES: the caller loaded the first chunk's CHUNK_PAGES block ids (`first_pages`, from
    # page kv_lo // PAGE) ahead of time; without it `first_pages` is not read.
    tok, head, row_ok = _tile_rows(row_lo, row_hi, kv_head, BLOCK_M, GROUP)  # token in the request, query head
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = q_ptr + q_base + tok[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # KV tiles below `full` are visible to every row of the tile: they skip all mask work.
    # The small path masks every tile in one loop instead. A decode over a few hundred
    # positions is two or three tiles, bound by the latency of its loads: split in two loops, the
    # masked loop's loads wait for the unmasked loop to drain, while one loop has every tile in
    # flight at once. On an H200, one Llama-3.2-1B decode went from 7.2 to 6.1 us and 16 of them
    # from 8.6 to 7.8 us; long decodes pay for the masks (64 decodes of 0.5-4k positions with
    # Llama-3-8B heads: 183 -> 196 us). Keeping both loop forms behind a run-time test cost more
    # than either (its registers are the union of both: 268 us there).
    if SMALL:
        full_end = kv_lo  # not read: the small path runs its spans ALL_MASKED
    else:
        if MASK_KIND != 0:
            full = kv_lo
        elif HAS_TREE:
            full = seq_len - q_len
        elif CAUSAL:
            full = pos_offset + row_lo // GROUP + 1
        else:
            full = kv_hi
        full = tl.minimum(full, kv_hi)
        full_end = kv_lo + tl.maximum(full - kv_lo, 0) // BLOCK_N * BLOCK_N
    if KV_CHUNK > 0:
        # The block table is read once per chunk of KV_CHUNK positions and each tile gathers its
        # block ids from registers. A block-table load inside the tile loop feeds the K/V
        # addresses, and Triton's pipeliner then keeps one K/V tile in flight instead of two: on
        # an H200 a 4 x 2048 prefill (Llama-3-8B heads) took 617 us that way, 494 us with chunks
        # (the same kernel on dense K/V: 383 us). Each chunk drains the pipeline once, so chunks
        # are long (1k-token chunks: 530 us). Decodes gain too: 48 decodes and 4 verifies inside
        # the mixed batch 220 -> 175 us (the mixed batch 413 -> 357 us), 64 decodes of 0.5-4k
        # 194 -> 170 us with 64-wide tiles in the memory variant (per-tile reads liked 128-wide).
        if FIRST_PAGES:
            pages = first_pages
        for c0 in range(kv_lo, kv_hi, KV_CHUNK):
            p0 = c0 // PAGE
            if FIRST_PAGES:
                if c0 != kv_lo:
                    pages, p0 = _chunk_pages(bt_ptr, b, c0, kv_hi, stride_bt, PAGE, CHUNK_PAGES)
            else:
                pages, p0 = _chunk_pages(bt_ptr, b, c0, kv_hi, stride_bt, PAGE, CHUNK_PAGES)
            c_hi = tl.minimum(c0 + KV_CHUNK, kv_hi)
            acc, m_i, l_i, row_lo = _kv_spans(
                acc, m_i, l_i, q, k_ptr, v_ptr, bt_ptr, pages, p0, b, c0, tl.minimum(tl.maximum(full_end, c0), c_hi),
                c_hi, kv_head, d, dv, row_lo, row_hi, q_row0, q_len, seq_len, kv_hi, pos_offset, GROUP, scale_log2,
                stride_bt, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, tree_ptr, stride_tree,
                mask_ptr, stride_mb, stride_mh, stride_ms, stride_ml, BLOCK_N, HEAD_DIM, HEAD_DIM_V, PAGED, PAGE,
                SMALL, CAUSAL, HAS_TREE, MASK_KIND, DOT_FP32, IEEE, True)
    else:
        acc, m_i, l_i, row_lo = _kv_spans(
            acc, m_i, l_i, q, k_ptr, v_ptr, bt_ptr, b, b, b, kv_lo, full_end, kv_hi, kv_head, d, dv, row_lo, row_hi,
            q_row0, q_len, seq_len, kv_hi, pos_offset, GROUP, scale_log2, stride_bt, stride_kb, stride_ks, stride_kh,
            stride_vb, stride_vs, stride_vh, tree_ptr, stride_tree, mask_ptr, stride_mb, stride_mh, stride_ms,
            stride_ml, BLOCK_N, HEAD_DIM, HEAD_DIM_V, PAGED, PAGE, SMALL, CAUSAL, HAS_TREE, MASK_KIND, DOT_FP32, IEEE,
            False)
    # rebuilt from the loop's copy of row_lo, not reused from the Q load: see _kv_span
    tok, head, row_ok = _tile_rows(row_lo, row_hi, kv_head, BLOCK_M, GROUP)
    if SMALL:
        if part_base >= 0:
            _merge_pieces(part_ptr, ml_ptr, count_ptr, acc, m_i, l_i, part_base, split, num_splits,
                          o_ptr, o_base, tok, head, dv, row_ok, stride_ot, stride_oh, BLOCK_M, BLOCK_DV, HEAD_DIM_V)
        else:
            _store_rows(o_ptr, o_base, acc, l_i, tok, head, dv, row_ok, stride_ot, stride_oh, HEAD_DIM_V)
    else:
        _store_rows(o_ptr, o_base, acc, l_i, tok, head, dv, row_ok, stride_ot, stride_oh, HEAD_DIM_V)


@triton.jit
def meta_attention_kernel(
    table_ptr,  # [HEADER + P + 1 + num_tasks * TASK_FIELDS] int32 Task-Table (tiling.py)
    q_ptr,  # paged: [T, Hq, D] packed ; dense: [B, Hq, S, D]
    o_ptr,  # same layout as q, last dim Dv
    k_ptr,  # paged: [num_blocks, PAGE, Hkv, D] ; dense: [B, Hkv, L, D]
    v_ptr,  # paged: [num_blocks, PAGE, Hkv, Dv] ; dense: [B, Hkv, L, Dv]
    bt_ptr,  # [B, max_blocks] int32 block_table (paged only)
    cu_ptr,  # [B + 1] int32 cu_seqlens_q (paged only)
    seq_ptr,  # [B] int32 seq_lens (paged only; read by decode batches)
    tree_ptr,  # [T, max_q] uint8 tree mask (HAS_TREE only)
    mask_ptr,  # [B, Hq, S, L] bool-as-uint8 or float, broadcast by strides (MASK_KIND only)
    part_ptr,  # [max_partials, SMALL_M, BLOCK_DV] fp32 split-KV partial outputs
    ml_ptr,  # [max_partials, 2, SMALL_M] fp32 split-KV running max and sum
    count_ptr,  # [max_partials] int32 arrival counters, zero between launches
    num_requests, num_rows, dense_q_len, dense_kv_len, table_len, bt_width, scale_log2,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_bt,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_tree, stride_mb, stride_mh, stride_ms, stride_ml,
    SMALL_M: tl.constexpr, LARGE_M: tl.constexpr, SMALL_N: tl.constexpr, LARGE_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TREE: tl.constexpr, MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    KV_CHUNK: tl.constexpr, SMALL_KV_CHUNK: tl.constexpr, CHUNK_PAGES: tl.constexpr,  # 0, 0, 1 unless paged
    DECODE_N: tl.constexpr, DECODE_KV_CHUNK: tl.constexpr,  # a decode batch's KV tile and chunk (paged)
    KV_LAYOUT: tl.constexpr,  # which K/V strides are compiled in (attention.kv_layout): 0 none
):
    # Compile-time strides: the per-tile row addresses become shifts and adds instead of 64-bit
    # multiplies by run-time values (H100 probe of a 4 x 2048 prefill: 420 -> 367 us)
    num_kv_heads: tl.constexpr = NUM_HEADS // GROUP
    if KV_LAYOUT == 1:  # paged caches [num_blocks, PAGE, Hkv, D] without gaps
        stride_kh = HEAD_DIM
        stride_ks = num_kv_heads * HEAD_DIM
        stride_kb = PAGE * stride_ks
        stride_vh = HEAD_DIM_V
        stride_vs = num_kv_heads * HEAD_DIM_V
        stride_vb = PAGE * stride_vs
    elif KV_LAYOUT == 2:  # dense [B, Hkv, L, D] whose positions are D apart
        stride_ks = HEAD_DIM
        stride_vs = HEAD_DIM_V
    elif KV_LAYOUT == 3:  # dense views of [B, L, Hkv, D] (HF's projections before the cache)
        stride_ks = num_kv_heads * HEAD_DIM
        stride_kh = HEAD_DIM
        stride_vs = num_kv_heads * HEAD_DIM_V
        stride_vh = HEAD_DIM_V
    # A decode's time is a chain of dependent loads (table -> task -> block table -> K/V), so
    # everything that does not depend on an earlier load is issued at once: the program count,
    # the first slot's task range (speculatively: the usual table has one slot per program) and
    # the first padded row. A decode batch (table header) skips the task walk: its first pair's
    # KV length and block-table entries are loaded here with the header, so its K/V loads are
    # the second round trip instead of the fourth.
    pid = tl.program_id(0)
    num_slots = tl.load(table_ptr)  # programs the plan was dealt to; any grid size walks them all
    guess_ok = TABLE_HEADER + pid + 1 < table_len
    t_lo_next = tl.load(table_ptr + TABLE_HEADER + pid, mask=guess_ok, other=0)
    t_hi_next = tl.load(table_ptr + TABLE_HEADER + pid + 1, mask=guess_ok, other=0)
    walk_end = num_slots
    if PAGED:
        tail_row = tl.load(cu_ptr + num_requests)
        decode_pairs = tl.load(table_ptr + DECODE_FIELD) * num_kv_heads
        seq_len, pages = _pair_kv(seq_ptr, bt_ptr, pid // num_kv_heads, pid // num_kv_heads < num_requests, bt_width,
                                  stride_bt, CHUNK_PAGES)
        for pair in range(pid, decode_pairs, tl.num_programs(0)):
            b = pair // num_kv_heads
            if pair != pid:
                seq_len, pages = _pair_kv(seq_ptr, bt_ptr, b, pair < decode_pairs, bt_width, stride_bt, CHUNK_PAGES)
            # the request's one token (packed row b) and its GQA group over the whole KV
            _attend_tile(q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, tree_ptr, mask_ptr, part_ptr, ml_ptr, count_ptr,
                         b, b * 0, GROUP, pair % num_kv_heads, 0, seq_len, -1, 0, 1,
                         b.to(tl.int64) * stride_qt, b.to(tl.int64) * stride_ot, b, 1, seq_len, seq_len - 1, scale_log2,
                         stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         stride_tree, stride_mb, stride_mh, stride_ms, stride_ml,
                         SMALL_M, DECODE_N, BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V, GROUP,
                         PAGED, PAGE, CAUSAL, HAS_TREE, MASK_KIND, DOT_FP32, IEEE, True, DECODE_KV_CHUNK, CHUNK_PAGES,
                         pages, True)
        walk_end = tl.where(decode_pairs > 0, 0, num_slots)
    task_base = TABLE_HEADER + num_slots + 1
    for slot in range(pid, walk_end, tl.num_programs(0)):
        t_lo = t_lo_next
        t_hi = t_hi_next
        nxt = slot + tl.num_programs(0)
        t_lo_next = tl.load(table_ptr + TABLE_HEADER + nxt, mask=nxt < num_slots, other=0)
        t_hi_next = tl.load(table_ptr + TABLE_HEADER + nxt + 1, mask=nxt < num_slots, other=0)
        for t in range(t_lo, t_hi):
            task = table_ptr + task_base + t * FIELDS
            b = tl.load(task + 0)
            row_lo = tl.load(task + 1)
            row_hi = tl.load(task + 2)
            kv_head = tl.load(task + 3)
            kv_lo = tl.load(task + 4)
            kv_hi = tl.load(task + 5)
            path = tl.load(task + 6)
            part_base = tl.load(task + 7)
            split = tl.load(task + 8)
            num_splits = tl.load(task + 9)
            if PAGED:
                q_row0 = tl.load(task + 10)
                q_len = tl.load(task + 11)
                seq_len = tl.load(task + 12)
                pos_offset = seq_len - q_len  # new tokens sit at the end of the KV
                q_base = q_row0.to(tl.int64) * stride_qt
                o_base = q_row0.to(tl.int64) * stride_ot
            else:
                q_row0 = 0
                q_len = dense_q_len
                seq_len = dense_kv_len
                pos_offset = 0  # SDPA's is_causal is aligned top-left
                q_base = b.to(tl.int64) * stride_qb
                o_base = b.to(tl.int64) * stride_ob
            if path == SMALL_PATH:
                _attend_tile(q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, tree_ptr, mask_ptr, part_ptr, ml_ptr, count_ptr,
                             b, row_lo, row_hi, kv_head, kv_lo, kv_hi, part_base, split, num_splits,
                             q_base, o_base, q_row0, q_len, seq_len, pos_offset, scale_log2,
                             stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             stride_tree, stride_mb, stride_mh, stride_ms, stride_ml,
                             SMALL_M, SMALL_N, BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V, GROUP,
                             PAGED, PAGE, CAUSAL, HAS_TREE, MASK_KIND, DOT_FP32, IEEE, True, SMALL_KV_CHUNK, CHUNK_PAGES,
                             b, False)
            else:
                # a table planned for another variant may hold taller tiles: walk them in LARGE_M
                # row slices (never split, so no partials are involved)
                for r in range(row_lo, row_hi, LARGE_M):
                    _attend_tile(q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, tree_ptr, mask_ptr, part_ptr, ml_ptr, count_ptr,
                                 b, r, tl.minimum(r + LARGE_M, row_hi), kv_head, kv_lo, kv_hi, part_base, split, num_splits,
                                 q_base, o_base, q_row0, q_len, seq_len, pos_offset, scale_log2,
                                 stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                 stride_tree, stride_mb, stride_mh, stride_ms, stride_ml,
                                 LARGE_M, LARGE_N, BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V, GROUP,
                                 PAGED, PAGE, CAUSAL, HAS_TREE, MASK_KIND, DOT_FP32, IEEE, False,
                                 KV_CHUNK, CHUNK_PAGES, b, False)
    if PAGED:
        _zero_tail_rows(o_ptr, tail_row, num_rows, stride_ot, stride_oh,
                        NUM_HEADS, BLOCK_H, BLOCK_DV, HEAD_DIM_V)
