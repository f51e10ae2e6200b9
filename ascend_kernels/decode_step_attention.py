"""Attention inside the whole-step decode kernels. Batch 1 (decode_step_kernel.py): one q head's split
of the positions per program (split-KV), RoPE on the fly, the new token's K/V from registers, and the
merge of the splits that the o GEMV's staging does. Several rows (decode_rows_kernel.py): one (row,
q head) task at a time over all the row's positions.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.decode_step_layout import stage_layout as _stage_layout
from ascend_kernels.grid_sync import wait_stage


@gluon.jit
def _rope(src_ptr, d, cos_a, sin_a, D: gl.constexpr):
    """RoPE (rotate-half form) of one head of D values at src_ptr: x cos + rotate_half(x) sin, in fp32
    (sin_a carries rotate_half's sign)."""
    x = gl.load(src_ptr + d, cache_modifier=".cg")
    return x * cos_a + gl.load(src_ptr + (d + D // 2) % D, cache_modifier=".cg") * sin_a


@gluon.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, bt_ptr, base, t0, end, pos, d, BS: gl.constexpr, NKV: gl.constexpr,
             D: gl.constexpr, T: gl.constexpr, ROW: gl.constexpr):
    """Positions t0 .. t0 + T - 1 and their cached K/V rows (bf16; zero past the cached positions)."""
    p = t0 + gl.arange(0, T, layout=ROW)
    cached = p < gl.minimum(end, pos)
    slot = gl.load(bt_ptr + p // BS, mask=cached, other=0) * BS + p % BS
    offs = base + gl.expand_dims(slot * (NKV * D), 1) + gl.expand_dims(d, 0)
    ok = gl.expand_dims(cached, 1)
    return p, gl.load(k_cache_ptr + offs, mask=ok, other=0.0), gl.load(v_cache_ptr + offs, mask=ok, other=0.0)


@gluon.jit
def _attend(p, k, v, q, k_new, v_new, pos, end, m_i, l_i, acc):
    """Online softmax over one tile (the new token's row comes from registers)."""
    is_new = gl.expand_dims(p == pos, 1)
    k = gl.where(is_new, gl.expand_dims(k_new, 0), k.to(gl.float32))
    v = gl.where(is_new, gl.expand_dims(v_new, 0), v.to(gl.float32))
    s = gl.where(p < end, gl.sum(k * gl.expand_dims(q, 0), axis=1), -1.0e30)
    m_new = gl.maximum(m_i, gl.max(s, axis=0))
    alpha = gl.exp2(m_i - m_new)
    e = gl.where(p < end, gl.exp2(s - m_new), 0.0)
    return m_new, l_i * alpha + gl.sum(e, axis=0), acc * alpha + gl.sum(gl.expand_dims(e, 1) * v, axis=0)


@gluon.jit
def attention_split(layer, qkv_ptr, part_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, pos, inv_freq_ptr, rope_scale,
                    qk_scale, layer_stride, cnt_ptr, qkv_done, G, ns, NQH: gl.constexpr, NKV: gl.constexpr,
                    D: gl.constexpr, BS: gl.constexpr, T: gl.constexpr, NB: gl.constexpr):
    """This program's split (of ns) of one q head over positions 0..pos (pos = the new token). The cached
    K/V and RoPE's angles do not depend on this step: they are loaded before the wait for q/k/v."""
    LA: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [NB, 1], [1, 0])  # [T positions, D]
    COL: gl.constexpr = gl.SliceLayout(0, LA)
    ROW: gl.constexpr = gl.SliceLayout(1, LA)
    pid = gl.program_id(0)
    hq = pid // ns
    sp = pid % ns
    kvh = hq // (NQH // NKV)
    d = gl.arange(0, D, layout=COL)
    span = (pos + ns) // ns  # cdiv(pos + 1, ns)
    start = sp * span
    end = gl.minimum(pos + 1, start + span)
    base = layer.to(gl.int64) * layer_stride + kvh * D  # a whole cache can pass 2^31 elements
    p, k, v = _kv_tile(k_cache_ptr, v_cache_ptr, bt_ptr, base, start, end, pos, d, BS, NKV, D, T, ROW)
    ang = pos.to(gl.float32) * gl.load(inv_freq_ptr + d % (D // 2))
    cos_a = gl.cos(ang) * rope_scale
    sin_a = gl.where(d < D // 2, -1.0, 1.0) * gl.sin(ang) * rope_scale
    wait_stage(cnt_ptr, qkv_done, G)
    q = _rope(qkv_ptr + hq * D, d, cos_a, sin_a, D) * qk_scale  # log2 domain
    k_new = _rope(qkv_ptr + (NQH + kvh) * D, d, cos_a, sin_a, D)
    v_new = gl.load(qkv_ptr + (NQH + NKV + kvh) * D + d, cache_modifier=".cg")
    m_i, l_i, acc = _attend(p, k, v, q, k_new, v_new, pos, end, gl.to_tensor(-1.0e30), gl.to_tensor(0.0),
                            gl.zeros([D], gl.float32, COL))
    for t0 in range(start + T, end, T):  # longer contexts than ns * T
        p, k, v = _kv_tile(k_cache_ptr, v_cache_ptr, bt_ptr, base, t0, end, pos, d, BS, NKV, D, T, ROW)
        m_i, l_i, acc = _attend(p, k, v, q, k_new, v_new, pos, end, m_i, l_i, acc)
    out = part_ptr + (hq * ns + sp) * (D + 2)
    gl.store(out + d, acc)
    gl.store(out + D + d, gl.where(d == 0, m_i, l_i), mask=d < 2)
    if (sp == 0) & (hq % (NQH // NKV) == 0):  # the new token's K/V, for later steps
        new_slot = gl.load(bt_ptr + pos // BS) * BS + pos % BS
        dst = base + new_slot * (NKV * D) + d
        gl.store(k_cache_ptr + dst, k_new.to(k_cache_ptr.dtype.element_ty))
        gl.store(v_cache_ptr + dst, v_new.to(v_cache_ptr.dtype.element_ty))


@gluon.jit
def _merge(xs, part_ptr, H: gl.constexpr, D: gl.constexpr, NS: gl.constexpr, NB: gl.constexpr):
    """Every head's NS partials merged (flash-decoding's combine) into xs. The loops are static, so all the
    partials' loads go out at once: on a card streaming weights each round trip waited for in turn costs
    about a microsecond (runtime loops cost 24 us a step on an H200, benchmarks/RESULTS.md)."""
    kk = _stage_layout(H, NB)
    head = kk // D
    base = part_ptr + head * (NS * (D + 2))
    m = gl.load(base + D, cache_modifier=".cg")
    for sp in gl.static_range(1, NS):
        m = gl.maximum(m, gl.load(base + sp * (D + 2) + D, cache_modifier=".cg"))
    num = gl.zeros_like(m)
    den = gl.zeros_like(m)
    for sp in gl.static_range(NS):
        w = gl.exp2(gl.load(base + sp * (D + 2) + D, cache_modifier=".cg") - m)
        num += w * gl.load(base + sp * (D + 2) + kk % D, cache_modifier=".cg")
        den += w * gl.load(base + sp * (D + 2) + D + 1, cache_modifier=".cg")
    xs.slice(0, H // 8, dim=0).store(num / den)


@gluon.jit
def stage_merge(xs, part_ptr, ns, H: gl.constexpr, D: gl.constexpr, NSPLIT: gl.constexpr, NB: gl.constexpr):
    """The o GEMV's input from ns = NSPLIT or 2 NSPLIT partials a head: a branch (uniform over the grid)
    between two static merges, so short contexts run exactly the NSPLIT merge."""
    if ns == NSPLIT:
        _merge(xs, part_ptr, H, D, NSPLIT, NB)
    else:
        _merge(xs, part_ptr, H, D, 2 * NSPLIT, NB)


@gluon.jit
def attention_rows(layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, slot_ptr,
                   inv_freq_ptr, rope_scale, qk_scale, layer_stride, cnt_ptr, qkv_done, G, M, NQH: gl.constexpr,
                   NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, T: gl.constexpr, NB: gl.constexpr):
    """The multi-row kernel's attention (decode_rows_kernel.py): task t = (row t // NQH, q head t % NQH)
    of M * NQH, dealt round-robin to the G programs, each over all of its row's positions (no split: 16
    rows give enough tasks). Writes the normalised output attn[row, head * D:] (fp32) and, for the first
    q head of each KV head, the new token's K/V at the row's slot."""
    LA: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [NB, 1], [1, 0])  # [T positions, D]
    COL: gl.constexpr = gl.SliceLayout(0, LA)
    ROW: gl.constexpr = gl.SliceLayout(1, LA)
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    d = gl.arange(0, D, layout=COL)
    for task in range(gl.program_id(0), M * NQH, G):
        m = task // NQH
        hq = task % NQH
        kvh = hq // (NQH // NKV)
        pos = gl.load(pos_ptr + m).to(gl.int32)
        bt = bt_ptr + m * bt_stride
        base = layer.to(gl.int64) * layer_stride + kvh * D
        p, k, v = _kv_tile(k_cache_ptr, v_cache_ptr, bt, base, 0, pos + 1, pos, d, BS, NKV, D, T, ROW)
        ang = pos.to(gl.float32) * gl.load(inv_freq_ptr + d % (D // 2))
        cos_a = gl.cos(ang) * rope_scale
        sin_a = gl.where(d < D // 2, -1.0, 1.0) * gl.sin(ang) * rope_scale
        wait_stage(cnt_ptr, qkv_done, G)  # returns at once after a program's first task
        row = qkv_ptr + m * NQ
        q = _rope(row + hq * D, d, cos_a, sin_a, D) * qk_scale  # log2 domain
        k_new = _rope(row + (NQH + kvh) * D, d, cos_a, sin_a, D)
        v_new = gl.load(row + (NQH + NKV + kvh) * D + d, cache_modifier=".cg")
        m_i, l_i, acc = _attend(p, k, v, q, k_new, v_new, pos, pos + 1, gl.to_tensor(-1.0e30), gl.to_tensor(0.0),
                                gl.zeros([D], gl.float32, COL))
        for t0 in range(T, pos + 1, T):
            p, k, v = _kv_tile(k_cache_ptr, v_cache_ptr, bt, base, t0, pos + 1, pos, d, BS, NKV, D, T, ROW)
            m_i, l_i, acc = _attend(p, k, v, q, k_new, v_new, pos, pos + 1, m_i, l_i, acc)
        gl.store(attn_ptr + m * (NQH * D) + hq * D + d, acc / l_i)
        if hq % (NQH // NKV) == 0:  # the new token's K/V, for later steps
            dst = base + gl.load(slot_ptr + m) * (NKV * D) + d
            gl.store(k_cache_ptr + dst, k_new.to(k_cache_ptr.dtype.element_ty))
            gl.store(v_cache_ptr + dst, v_new.to(v_cache_ptr.dtype.element_ty))
