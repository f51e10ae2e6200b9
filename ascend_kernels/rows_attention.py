"""Decode attention inside the wgmma multi-row step kernel (decode_rows_wgmma_kernel.py), one (row, KV
head) task at a time: the GQA group's q heads share every K/V tile, and the two products run on tensor
cores (`mma_v2`, the group padded to 16 rows).

    q group [16, D]  (rows >= GROUP zero)        S = q K^T    [16, T]   (log2 domain, masked past pos)
    K, V tile [T, D] (the block table's slots)   acc = P V    [16, D]   (online softmax over the tiles)

The task was bound by its instructions' latency, not by bytes. What took it from ~25 to ~10 us a layer
at 16 rows on an H100 (benchmarks/RESULTS.md, twentieth session):
- kv_prefetch: the cached positions (all but the new token's) do not depend on this step, so the
  programs idle during q/k/v pull them into L2; the tasks then wait on L2, not HBM, latency.
- the new token's K/V enter the softmax from registers (its store to the cache is for later steps):
  no store, barrier and reload before the first tile.
- rope_rows: cos and sin once a step per row, not per task per layer.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ascend_kernels.grid_sync import wait_stage

QROWS = gl.constexpr(16)  # the tensor cores' smallest M: the GQA group padded


@gluon.jit
def _roped(src_ptr, rows, d, cos_a, sin_a, ok, D: gl.constexpr):
    """RoPE (rotate-half form) of heads at src_ptr + rows * D: x cos + rotate_half(x) sin, fp32."""
    x = gl.load(src_ptr + rows * D + d, mask=ok, other=0.0, cache_modifier=".cg").to(gl.float32)
    xr = gl.load(src_ptr + rows * D + (d + D // 2) % D, mask=ok, other=0.0, cache_modifier=".cg").to(gl.float32)
    return x * cos_a + xr * sin_a


@gluon.jit
def _tile_slots(bt, t0, last, T: gl.constexpr, BS: gl.constexpr, LQ: gl.constexpr):
    """The cache slots [T, 1] of positions t0 .. t0 + T - 1 (0 past `last`)."""
    p = t0 + gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(1, LQ)), 1)
    return gl.load(bt + p // BS, mask=p <= last, other=0) * BS + p % BS


@gluon.jit
def _tile_kv(k_cache_ptr, v_cache_ptr, base, slot, t0, last, NKV: gl.constexpr, D: gl.constexpr,
             T: gl.constexpr, LQ: gl.constexpr):
    """K and V [T, D] of positions t0 .. t0 + T - 1 at `slot` (zero past `last`, with no memory traffic)."""
    p = t0 + gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(1, LQ)), 1)
    d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LQ)), 0)
    ok = (p <= last) & (d >= 0)
    offs = base + slot.to(gl.int64) * (NKV * D) + d
    return gl.load(k_cache_ptr + offs, mask=ok, other=0.0), gl.load(v_cache_ptr + offs, mask=ok, other=0.0)


@gluon.jit
def rope_rows(pos_ptr, inv_freq_ptr, rope_ptr, rope_scale, G, M, D: gl.constexpr):
    """Each row's RoPE factors, once a step (the position is the same in every layer): rope[row] =
    [cos(pos f) s | sin(pos f) s] ([2, D] fp32), the rotate-half sign folded into the sine half. The
    tasks then load 2 D numbers instead of evaluating cos and sin (~500 instructions a task a layer)."""
    L: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    d = gl.arange(0, D, layout=L)
    for m in range(gl.program_id(0), M, G):
        ang = gl.load(pos_ptr + m).to(gl.float32) * gl.load(inv_freq_ptr + d % (D // 2))
        gl.store(rope_ptr + m * 2 * D + d, gl.cos(ang) * rope_scale)
        gl.store(rope_ptr + m * 2 * D + D + d, gl.where(d < D // 2, -1.0, 1.0) * gl.sin(ang) * rope_scale)


@gluon.jit
def _prefetch_l2(ptrs):
    """`prefetch.global.L2` of each address (sm_90 PTX, as the rest of this kernel): no register waits."""
    return gl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def kv_prefetch(layer, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, layer_stride, M, G, first,
                NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr):
    """Programs first .. G - 1 (those without q/k/v items) pull the cached K/V of this layer's tasks into
    L2 while q/k/v runs: positions before each row's new token do not depend on this step, and the
    attention tasks then load them at L2 latency. One 128-byte line per (position, KV head) when D = 64."""
    P: gl.constexpr = 256
    L1: gl.constexpr = gl.BlockedLayout([2], [32], [4], [0])
    r = gl.program_id(0) - first
    if r >= 0:
        for task in range(r, M * NKV, G - first):
            m = task // NKV
            pos = gl.load(pos_ptr + m).to(gl.int32)
            base = layer.to(gl.int64) * layer_stride + (task % NKV) * D
            for t0 in range(0, pos, P):
                p = t0 + gl.arange(0, P, layout=L1)
                slot = gl.load(bt_ptr + m * bt_stride + p // BS, mask=p < pos, other=0) * BS + p % BS
                offs = base + gl.where(p < pos, slot, 0).to(gl.int64) * (NKV * D)
                _prefetch_l2(k_cache_ptr + offs)
                _prefetch_l2(v_cache_ptr + offs)


@gluon.jit
def _group_task(m, kvh, layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, slot_ptr,
                rope_ptr, qk_scale, layer_stride, NQH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
                BS: gl.constexpr, T: gl.constexpr):
    """One (row, KV head) task: the new token's K/V enter the softmax from registers (and go to the cache
    for later steps), the cached positions 0 .. pos - 1 from tiles loaded one ahead of the one computed
    (the warps issue in order: a load's latency hides only behind work issued after it; kv_prefetch
    made it an L2 latency, shorter than a tile's work)."""
    GROUP: gl.constexpr = NQH // NKV
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    LQ: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    gg = gl.expand_dims(gl.arange(0, QROWS, layout=gl.SliceLayout(1, LQ)), 1)
    d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LQ)), 0)
    pos = gl.load(pos_ptr + m).to(gl.int32)
    bt = bt_ptr + m * bt_stride
    base = layer.to(gl.int64) * layer_stride + kvh * D
    k0, v0 = _tile_kv(k_cache_ptr, v_cache_ptr, base, _tile_slots(bt, 0, pos - 1, T, BS, LQ), 0, pos - 1, NKV, D, T, LQ)
    slot1 = _tile_slots(bt, T, pos - 1, T, BS, LQ)
    cos_a = gl.load(rope_ptr + m * 2 * D + d, cache_modifier=".cg")  # rope_rows (another program wrote it)
    sin_a = gl.load(rope_ptr + m * 2 * D + D + d, cache_modifier=".cg")
    row = qkv_ptr + m * NQ
    q = _roped(row + kvh * GROUP * D, gg, d, cos_a, sin_a, (gg < GROUP) & (d >= 0), D) * qk_scale
    every = (gg >= 0) & (d >= 0)  # the new token's K/V broadcast to every row of a [16, D] tile
    k_new = _roped(row + (NQH + kvh) * D, gg * 0, d, cos_a, sin_a, every, D)
    v_new = gl.load(row + (NQH + NKV + kvh) * D + gg * 0 + d, cache_modifier=".cg")
    dst = base + gl.load(slot_ptr + m) * (NKV * D) + gg * 0 + d
    gl.store(k_cache_ptr + dst, k_new.to(k_cache_ptr.dtype.element_ty), mask=(gg == 0) & (d >= 0))
    gl.store(v_cache_ptr + dst, v_new.to(v_cache_ptr.dtype.element_ty), mask=(gg == 0) & (d >= 0))
    q_a = gl.convert_layout(q.to(gl.bfloat16), A)
    # the softmax starts from the new token: m = its score, l = 1, acc = its value (unrounded, as the
    # batch-1 kernel and the oracle attend to it)
    m_i = gl.convert_layout(gl.sum(q * k_new, axis=1), gl.SliceLayout(1, MMA))
    l_i = gl.full([QROWS], 1.0, gl.float32, gl.SliceLayout(1, MMA))
    acc = gl.convert_layout(v_new.to(gl.float32), MMA)
    for t0 in range(0, pos, T):
        k1, v1 = _tile_kv(k_cache_ptr, v_cache_ptr, base, slot1, t0 + T, pos - 1, NKV, D, T, LQ)
        slot1 = _tile_slots(bt, t0 + 2 * T, pos - 1, T, BS, LQ)
        s = mma_v2(q_a, gl.convert_layout(gl.permute(k0, (1, 0)), B), gl.zeros([QROWS, T], gl.float32, MMA))
        ps = t0 + gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(0, MMA)), 0)
        s = gl.where(ps < pos, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        pr = gl.exp2(s - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(pr, axis=1)
        acc = mma_v2(gl.convert_layout(pr.to(gl.bfloat16), A), gl.convert_layout(v0, B),
                     acc * gl.expand_dims(alpha, 1))
        m_i = m_new
        k0, v0 = k1, v1
    out = gl.convert_layout(acc / gl.expand_dims(l_i, 1), LQ)
    gl.store(attn_ptr + m * (NQH * D) + (kvh * GROUP + gg) * D + d, out.to(attn_ptr.dtype.element_ty),
             mask=(gg < GROUP) & (d >= 0))


@gluon.jit
def attention_groups(layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, slot_ptr,
                     rope_ptr, qk_scale, layer_stride, cnt_ptr, qkv_done, G, M, NQH: gl.constexpr,
                     NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, T: gl.constexpr):
    """Task t = (row t // NKV, KV head t % NKV) of M * NKV, dealt round-robin to the G programs once q/k/v
    (counter qkv_done) is in: the normalised output attn[row, head * D:] of the group's q heads, and the
    new token's K/V at the row's slot."""
    gl.static_assert(NQH // NKV <= QROWS)
    if gl.program_id(0) < M * NKV:
        wait_stage(cnt_ptr, qkv_done, G)
    for task in range(gl.program_id(0), M * NKV, G):
        _group_task(task // NKV, task % NKV, layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride,
                    pos_ptr, slot_ptr, rope_ptr, qk_scale, layer_stride, NQH, NKV, D, BS, T)
