"""Decode attention inside the multi-row step kernels, one (row, KV head) task at a time: the GQA group's
q heads share every K/V tile, and the two products run on tensor cores (`mma_v2`, the group padded to
16 rows). The (row, q head) form (decode_step_attention.attention_rows) loads each K/V tile once per q
head and takes ~47 us a layer at 16 rows in the wgmma step kernel (benchmarks/RESULTS.md, nineteenth
session); this is its replacement, compiled for sm_90 but NOT YET RUN on a GPU.

    q group [16, D]  (rows >= GROUP zero)        S = q K^T    [16, T]   (log2 domain, masked past pos)
    K, V tile [T, D] (the block table's slots)   acc = P V    [16, D]   (online softmax over the tiles)

The task first stores the new token's K/V (RoPE'd) at its slot, so the tiles cover positions 0 .. pos
from the cache alone.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.grid_sync import wait_stage

QROWS = gl.constexpr(16)  # the tensor cores' smallest M: the GQA group padded


@gluon.jit
def _roped(src_ptr, rows, d, cos_a, sin_a, ok, D: gl.constexpr):
    """RoPE (rotate-half form) of heads at src_ptr + rows * D: x cos + rotate_half(x) sin, fp32."""
    x = gl.load(src_ptr + rows * D + d, mask=ok, other=0.0, cache_modifier=".cg").to(gl.float32)
    xr = gl.load(src_ptr + rows * D + (d + D // 2) % D, mask=ok, other=0.0, cache_modifier=".cg").to(gl.float32)
    return x * cos_a + xr * sin_a


@gluon.jit
def _group_task(m, kvh, layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, slot_ptr,
                inv_freq_ptr, rope_scale, qk_scale, layer_stride, NQH: gl.constexpr, NKV: gl.constexpr,
                D: gl.constexpr, BS: gl.constexpr, T: gl.constexpr):
    GROUP: gl.constexpr = NQH // NKV
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    LQ: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # [16 | T, D] tiles, 4 warps
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    gg = gl.expand_dims(gl.arange(0, QROWS, layout=gl.SliceLayout(1, LQ)), 1)  # [16, 1] head in the group
    d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LQ)), 0)  # [1, D]
    pos = gl.load(pos_ptr + m).to(gl.int32)
    ang = pos.to(gl.float32) * gl.load(inv_freq_ptr + d % (D // 2))
    cos_a = gl.cos(ang) * rope_scale
    sin_a = gl.where(d < D // 2, -1.0, 1.0) * gl.sin(ang) * rope_scale
    row = qkv_ptr + m * NQ
    q = _roped(row + kvh * GROUP * D, gg, d, cos_a, sin_a, (gg < GROUP) & (d >= 0), D) * qk_scale
    one = (gg == 0) & (d >= 0)  # the new token's K/V: one head, in row 0 of a [16, D] tile
    k_new = _roped(row + (NQH + kvh) * D, gg * 0, d, cos_a, sin_a, one, D)
    v_new = gl.load(row + (NQH + NKV + kvh) * D + gg * 0 + d, mask=one, other=0.0, cache_modifier=".cg")
    base = layer.to(gl.int64) * layer_stride + kvh * D
    dst = base + gl.load(slot_ptr + m) * (NKV * D) + gg * 0 + d
    gl.store(k_cache_ptr + dst, k_new.to(k_cache_ptr.dtype.element_ty), mask=one)
    gl.store(v_cache_ptr + dst, v_new.to(v_cache_ptr.dtype.element_ty), mask=one)
    _barrier()  # the stores above are visible to every warp's tile loads below
    q_a = gl.convert_layout(q.to(gl.bfloat16), A)
    bt = bt_ptr + m * bt_stride
    m_i = gl.full([QROWS], float("-inf"), gl.float32, gl.SliceLayout(1, MMA))
    l_i = gl.zeros([QROWS], gl.float32, gl.SliceLayout(1, MMA))
    acc = gl.zeros([QROWS, D], gl.float32, MMA)
    for t0 in range(0, pos + 1, T):
        p = t0 + gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(1, LQ)), 1)  # [T, 1]
        ok = (p <= pos) & (d >= 0)
        slot = gl.load(bt + p // BS, mask=p <= pos, other=0) * BS + p % BS
        offs = base + slot.to(gl.int64) * (NKV * D) + d
        k = gl.load(k_cache_ptr + offs, mask=ok, other=0.0)
        v = gl.load(v_cache_ptr + offs, mask=ok, other=0.0)
        s = mma_v2(q_a, gl.convert_layout(gl.permute(k, (1, 0)), B), gl.zeros([QROWS, T], gl.float32, MMA))
        ps = t0 + gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(0, MMA)), 0)
        s = gl.where(ps <= pos, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        pr = gl.exp2(s - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(pr, axis=1)
        acc = mma_v2(gl.convert_layout(pr.to(gl.bfloat16), A), gl.convert_layout(v, B),
                     acc * gl.expand_dims(alpha, 1))
        m_i = m_new
    out = gl.convert_layout(acc / gl.expand_dims(l_i, 1), LQ)
    gl.store(attn_ptr + m * (NQH * D) + (kvh * GROUP + gg) * D + d, out.to(attn_ptr.dtype.element_ty),
             mask=(gg < GROUP) & (d >= 0))


@gluon.jit
def attention_groups(layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, slot_ptr,
                     inv_freq_ptr, rope_scale, qk_scale, layer_stride, cnt_ptr, qkv_done, G, M, NQH: gl.constexpr,
                     NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, T: gl.constexpr):
    """Task t = (row t // NKV, KV head t % NKV) of M * NKV, dealt round-robin to the G programs, each over
    all of its row's positions: the normalised output attn[row, head * D:] of the group's q heads, and
    the new token's K/V at the row's slot (the same contract as attention_rows)."""
    gl.static_assert(NQH // NKV <= QROWS)
    if gl.program_id(0) < M * NKV:
        wait_stage(cnt_ptr, qkv_done, G)
    for task in range(gl.program_id(0), M * NKV, G):
        _group_task(task // NKV, task % NKV, layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride,
                    pos_ptr, slot_ptr, inv_freq_ptr, rope_scale, qk_scale, layer_stride, NQH, NKV, D, BS, T)
