"""Hopper (sm_90) paged prefill attention in Gluon: warp-specialised, persistent, FA3-style overlap.

Imported only on a Hopper GPU (see prefill_hopper.py): Gluon has no CPU interpreter, and the
portable Triton meta-kernel serves every other target. One CTA per SM walks its tiles of a Task
list; a tile is (request, 128 query rows, one q head). Three partitions share the SM:

    loader (1 warp)     Q tile -> q_smem[QBUF]; K/V tiles -> ring of NUM_BUF slots, page by page
    compute 0 (4 warps) rows  0..63 of the tile: S = Q K^T, online softmax, O += P V (wgmma)
    compute 1 (4 warps) rows 64..127

The loader runs ahead across tile boundaries, so the next tile's Q and first K/V tiles arrive while
the compute warpgroups finish the current one. K/V tiles of BLOCK_N tokens are gathered with one TMA
copy per page and head-dim half:

    k_smem[slot * 2 + half]   [BLOCK_N, D/2]   (one 128-byte swizzled row per token when D = 128)
      rows 0..PAGE-1         <- page block_table[b, t * BLOCK_N / PAGE + 0]
      rows PAGE..2*PAGE-1    <- page block_table[b, t * BLOCK_N / PAGE + 1]  ...

Splitting the head dim keeps every smem row one swizzle row, so a page's rows are an aligned slice.
Per warpgroup, S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued back to back; the softmax of S_j
runs while the P.V wgmma is still in flight (FA3's intra-warpgroup overlap). The two warpgroups take
turns to issue (FA3's ping-pong, two mbarriers): one's softmax runs while the other's wgmmas do.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ascend_kernels.gluon_compat import (
    tma_load as _tma_load,  # renamed between Triton 3.6 and 3.9
)


@gluon.jit
def _tile_info(tiles_ptr, cu_ptr, lens_ptr, idx):
    """(request or -1 for a hole, first query row, q head, q_start, q_len, kv_len) of task `idx`."""
    b = gl.load(tiles_ptr + idx * 3)
    m0 = gl.load(tiles_ptr + idx * 3 + 1)
    h = gl.load(tiles_ptr + idx * 3 + 2)
    bb = gl.maximum(b, 0)
    q_start = gl.load(cu_ptr + bb)
    return b, m0, h, q_start, gl.load(cu_ptr + bb + 1) - q_start, gl.load(lens_ptr + bb)


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, bt_ptr, bt_row, num_pages, rc, t, kv_col,
              BLOCK_N: gl.constexpr, PAGE: gl.constexpr, HALF: gl.constexpr, NUM_BUF: gl.constexpr):
    """Gather K/V tile t of a request into ring slot rc % NUM_BUF, once both warpgroups freed it."""
    slot = rc % NUM_BUF
    mbarrier.wait(empty.index(slot), ((rc // NUM_BUF) & 1) ^ 1)
    nbytes: gl.constexpr = 2 * BLOCK_N * HALF * k_desc.dtype.primitive_bitwidth // 8
    mbarrier.expect(kbar.index(slot), nbytes)
    mbarrier.expect(vbar.index(slot), nbytes)
    # all of K first: S = Q K^T can start as soon as K lands (P.V needs V one iteration later)
    for p in gl.static_range(BLOCK_N // PAGE):
        idx = t * (BLOCK_N // PAGE) + p
        row = gl.load(bt_ptr + bt_row + idx, mask=idx < num_pages, other=0) * PAGE
        for hf in gl.static_range(2):
            _tma_load(k_desc, [row, kv_col + hf * HALF], kbar.index(slot),
                      k_smem.index(slot * 2 + hf).slice(p * PAGE, PAGE))
    for p in gl.static_range(BLOCK_N // PAGE):
        idx = t * (BLOCK_N // PAGE) + p
        row = gl.load(bt_ptr + bt_row + idx, mask=idx < num_pages, other=0) * PAGE  # an L1 hit now
        for hf in gl.static_range(2):
            _tma_load(v_desc, [row, kv_col + hf * HALF], vbar.index(slot),
                      v_smem.index(slot * 2 + hf).slice(p * PAGE, PAGE))


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, qempty, kbar, vbar, empty, turn, o_ptr, bt_ptr,
            tiles_ptr, cu_ptr, lens_ptr, num_rows, grid, stride_bt, qk_scale, NUM_HEADS: gl.constexpr,
            GROUP: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            PAGE: gl.constexpr, HALF: gl.constexpr, NUM_BUF: gl.constexpr, QBUF: gl.constexpr,
            s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, WG: gl.constexpr):
    rc = 0  # K/V ring position, continued across tiles (the compute partitions count the same way)
    it = 0
    for idx in range(gl.program_id(0), num_rows, grid):
        b, m0, h, q_start, q_len, kv_len = _tile_info(tiles_ptr, cu_ptr, lens_ptr, idx)
        if b >= 0:
            qs = it % QBUF
            mbarrier.wait(qempty.index(qs), ((it // QBUF) & 1) ^ 1)
            mbarrier.expect(qbar.index(qs), 2 * BLOCK_M * HALF * q_desc.dtype.primitive_bitwidth // 8)
            for hf in gl.static_range(2):
                _tma_load(q_desc, [q_start + m0, h * D + hf * HALF], qbar.index(qs), q_smem.index(qs * 2 + hf))
            num_tiles = gl.cdiv(gl.minimum(kv_len, kv_len - q_len + m0 + BLOCK_M), BLOCK_N)
            for t in range(num_tiles):
                _issue_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, bt_ptr, b * stride_bt,
                          gl.cdiv(kv_len, PAGE), rc + t, t, (h // GROUP) * D, BLOCK_N, PAGE, HALF, NUM_BUF)
            rc += num_tiles
            it += 1


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale, qpos0, key0, kv_len, MASK: gl.constexpr, WM: gl.constexpr,
             BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Online softmax of one score tile in exp2 form (qk_scale = scale * log2 e > 0, so the row max
    of raw scores scales once)."""
    if MASK:  # bottom-right causal, and keys past the request
        rows = gl.arange(0, WM, layout=gl.SliceLayout(1, s_layout))
        kpos = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        vis = (kpos[None, :] <= (qpos0 + rows)[:, None]) & (kpos[None, :] < kv_len)
        s = gl.where(vis, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha


@gluon.jit
def _qk(q0, q1, k_smem, slot, WM: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    s = gl.zeros([WM, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q0, k_smem.index(slot * 2).permute((1, 0)), s, use_acc=False, is_async=True)
    return warpgroup_mma(q1, k_smem.index(slot * 2 + 1).permute((1, 0)), s, is_async=True)


@gluon.jit
def _kv_loop(j0, j1, rc0, acc0, acc1, m_i, l_i, p, q0, q1, k_smem, v_smem, kbar, vbar, empty, qk_scale, qpos0,
             kv_len, my_turn, other_turn, pp0, MASK: gl.constexpr, WM: gl.constexpr, BLOCK_N: gl.constexpr,
             NUM_BUF: gl.constexpr,
             s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    for j in range(j0, j1):
        rc = rc0 + j
        slot = rc % NUM_BUF
        prev = (rc - 1) % NUM_BUF
        mbarrier.wait(kbar.index(slot), (rc // NUM_BUF) & 1)
        mbarrier.wait(vbar.index(prev), ((rc - 1) // NUM_BUF) & 1)
        mbarrier.wait(my_turn, (pp0 + j - 1) & 1)  # ping-pong: the warpgroups take turns to issue their wgmmas
        s = _qk(q0, q1, k_smem, slot, WM, BLOCK_N, s_layout)
        acc0 = warpgroup_mma(p, v_smem.index(prev * 2), acc0, is_async=True)
        acc1 = warpgroup_mma(p, v_smem.index(prev * 2 + 1), acc1, is_async=True)
        mbarrier.arrive(other_turn, count=1)
        s = warpgroup_mma_wait(2, deps=(s, ))
        pf, m_i, l_i, alpha = _softmax(s, m_i, l_i, qk_scale, qpos0, j * BLOCK_N, kv_len, MASK, WM, BLOCK_N, s_layout)
        p_new = gl.convert_layout(pf.to(k_smem.dtype), p_layout)
        acc0, acc1, p = warpgroup_mma_wait(0, deps=(acc0, acc1, p))  # P_{j-1}'s registers live until here
        p = p_new
        a = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc0 = acc0 * a
        acc1 = acc1 * a
        mbarrier.arrive(empty.index(prev), count=1)
    return acc0, acc1, m_i, l_i, p


@gluon.jit
def _zero_v_tail(v_smem, slot, keep, BLOCK_N: gl.constexpr):
    """Zero V rows >= keep of a slot: P is 0 there, but 0 * (NaN left in an unused cache slot) is NaN.
    Both warpgroups may do this for the same slot; they write the same values."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    for hf in gl.static_range(2):
        buf = v_smem.index(slot * 2 + hf)
        v = buf.load(layout)
        buf.store(gl.where((rows < keep)[:, None], v, gl.zeros_like(v)))
    fence_async_shared()  # generic-proxy stores before the wgmma's async-proxy reads


@gluon.jit
def _one_tile(q0, q1, k_smem, v_smem, kbar, vbar, empty, qempty_bar, rc, num_tiles, qk_scale, qpos0, kv_len,
              my_turn, other_turn, pp0, WM: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr,
              NUM_BUF: gl.constexpr,
              s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """One warpgroup's rows of a tile over K/V tiles rc .. rc+num_tiles-1 of the ring: (O0, O1, l)."""
    n_full = gl.minimum((qpos0 + 1) // BLOCK_N, num_tiles)  # tiles every row sees whole
    m_i = gl.full([WM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WM], gl.float32, gl.SliceLayout(1, s_layout))
    slot = rc % NUM_BUF
    mbarrier.wait(kbar.index(slot), (rc // NUM_BUF) & 1)
    s = warpgroup_mma_wait(0, deps=(_qk(q0, q1, k_smem, slot, WM, BLOCK_N, s_layout), ))
    if n_full > 0:  # tile 0: nothing to overlap yet
        pf, m_i, l_i, alpha = _softmax(s, m_i, l_i, qk_scale, qpos0, 0, kv_len, False, WM, BLOCK_N, s_layout)
    else:
        pf, m_i, l_i, alpha = _softmax(s, m_i, l_i, qk_scale, qpos0, 0, kv_len, True, WM, BLOCK_N, s_layout)
    p = gl.convert_layout(pf.to(k_smem.dtype), p_layout)
    acc0 = gl.zeros([WM, HALF], gl.float32, o_layout)
    acc1 = gl.zeros([WM, HALF], gl.float32, o_layout)
    acc0, acc1, m_i, l_i, p = _kv_loop(1, n_full, rc, acc0, acc1, m_i, l_i, p, q0, q1, k_smem, v_smem, kbar, vbar,
                                       empty, qk_scale, qpos0, kv_len, my_turn, other_turn, pp0, False, WM, BLOCK_N,
                                       NUM_BUF, s_layout,
                                       o_layout, p_layout)
    acc0, acc1, m_i, l_i, p = _kv_loop(gl.maximum(n_full, 1), num_tiles, rc, acc0, acc1, m_i, l_i, p, q0, q1,
                                       k_smem, v_smem, kbar, vbar, empty, qk_scale, qpos0, kv_len, my_turn, other_turn,
                                       pp0, True, WM, BLOCK_N,
                                       NUM_BUF, s_layout, o_layout, p_layout)
    mbarrier.arrive(qempty_bar, count=1)  # every S of this tile is done: Q's slot may be refilled
    last = rc + num_tiles - 1
    ls = last % NUM_BUF
    mbarrier.wait(vbar.index(ls), (last // NUM_BUF) & 1)
    if num_tiles * BLOCK_N > kv_len:
        _zero_v_tail(v_smem, ls, kv_len - (num_tiles - 1) * BLOCK_N, BLOCK_N)
    acc0 = warpgroup_mma(p, v_smem.index(ls * 2), acc0, is_async=True)
    acc1 = warpgroup_mma(p, v_smem.index(ls * 2 + 1), acc1, is_async=True)
    acc0, acc1, p = warpgroup_mma_wait(0, deps=(acc0, acc1, p))
    mbarrier.arrive(empty.index(ls), count=1)
    return acc0, acc1, l_i


# every partition takes the loader's signature (warp_specialize wants the workers' signatures equal); WG is the
# compute warpgroup (the loader ignores it)
@gluon.jit
def _compute(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, qempty, kbar, vbar, empty, turn, o_ptr, bt_ptr,
             tiles_ptr, cu_ptr, lens_ptr, num_rows, grid, stride_bt, qk_scale, NUM_HEADS: gl.constexpr,
             GROUP: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             PAGE: gl.constexpr, HALF: gl.constexpr, NUM_BUF: gl.constexpr, QBUF: gl.constexpr,
             s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, WG: gl.constexpr):
    WM: gl.constexpr = BLOCK_M // 2
    rc = 0
    it = 0
    for idx in range(gl.program_id(0), num_rows, grid):
        b, m0, h, q_start, q_len, kv_len = _tile_info(tiles_ptr, cu_ptr, lens_ptr, idx)
        if b >= 0:
            qs = it % QBUF
            r0 = m0 + WG * WM
            num_tiles = gl.cdiv(gl.minimum(kv_len, kv_len - q_len + m0 + BLOCK_M), BLOCK_N)
            mbarrier.wait(qbar.index(qs), (it // QBUF) & 1)
            acc0, acc1, l_i = _one_tile(q_smem.index(qs * 2).slice(WG * WM, WM),
                                        q_smem.index(qs * 2 + 1).slice(WG * WM, WM), k_smem, v_smem, kbar, vbar,
                                        empty, qempty.index(qs), rc, num_tiles, qk_scale, kv_len - q_len + r0, kv_len,
                                        turn.index(WG), turn.index(1 - WG), rc - it, WM, BLOCK_N, HALF, NUM_BUF,
                                        s_layout, o_layout, p_layout)  # rc - it: this warpgroup's turns so far
            inv = gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))[:, None]
            rows = gl.arange(0, WM, layout=gl.SliceLayout(1, o_layout))
            cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, o_layout))
            ptrs = o_ptr + ((q_start + r0 + rows) * (NUM_HEADS * D) + h * D)[:, None] + cols[None, :]
            ok = (r0 + rows < q_len)[:, None]
            gl.store(ptrs, (acc0 * inv).to(o_ptr.dtype.element_ty), mask=ok)
            gl.store(ptrs + HALF, (acc1 * inv).to(o_ptr.dtype.element_ty), mask=ok)
            rc += num_tiles
            it += 1


@gluon.jit
def prefill_hopper_kernel(q_desc,  # [T, Hq*D] fp16/bf16, block [BLOCK_M, D/2]
                          k_desc, v_desc,  # [num_blocks*PAGE, Hkv*D], block [PAGE, D/2]
                          o_ptr,  # [T, Hq, D] contiguous
                          bt_ptr,  # [B, max_blocks] int32 block_table
                          tiles_ptr,  # [num_rows, 3] int32: (request or -1, first query row, q head)
                          cu_ptr,  # [B+1] int32 cu_seqlens_q
                          lens_ptr,  # [B] int32 seq_lens (KV tokens per request)
                          num_rows, grid, stride_bt, qk_scale,
                          NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, PAGE: gl.constexpr, NUM_BUF: gl.constexpr, QBUF: gl.constexpr,
                          COMPUTE_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    HALF: gl.constexpr = D // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [QBUF * 2, BLOCK_M, HALF], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_BUF * 2, BLOCK_N, HALF], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF * 2, BLOCK_N, HALF], v_desc.layout)
    qbar = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    qempty = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    kbar = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    vbar = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(QBUF):
        mbarrier.init(qbar.index(i), count=1)
        mbarrier.init(qempty.index(i), count=2)  # one arrive per compute warpgroup
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(kbar.index(i), count=1)
        mbarrier.init(vbar.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    mbarrier.arrive(turn.index(0), count=1)  # warpgroup 0 issues first
    gl.warp_specialize([
        (_compute, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, qempty, kbar, vbar, empty, turn, o_ptr,
                    bt_ptr, tiles_ptr, cu_ptr, lens_ptr, num_rows, grid, stride_bt, qk_scale, NUM_HEADS, GROUP, D,
                    BLOCK_M, BLOCK_N, PAGE, HALF, NUM_BUF, QBUF, s_layout, o_layout, p_layout, 0)),
        (_compute, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, qempty, kbar, vbar, empty, turn, o_ptr,
                    bt_ptr, tiles_ptr, cu_ptr, lens_ptr, num_rows, grid, stride_bt, qk_scale, NUM_HEADS, GROUP, D,
                    BLOCK_M, BLOCK_N, PAGE, HALF, NUM_BUF, QBUF, s_layout, o_layout, p_layout, 1)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, qempty, kbar, vbar, empty, turn, o_ptr,
                   bt_ptr, tiles_ptr, cu_ptr, lens_ptr, num_rows, grid, stride_bt, qk_scale, NUM_HEADS, GROUP, D,
                   BLOCK_M, BLOCK_N, PAGE, HALF, NUM_BUF, QBUF, s_layout, o_layout, p_layout, 0)),
    ], [4, 1], [COMPUTE_REGS, LOADER_REGS])
    for i in gl.static_range(QBUF):
        mbarrier.invalidate(qbar.index(i))
        mbarrier.invalidate(qempty.index(i))
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(kbar.index(i))
        mbarrier.invalidate(vbar.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))
