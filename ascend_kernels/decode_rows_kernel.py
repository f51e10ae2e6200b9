"""A decode step of up to MB = 16 requests of a Llama-style decoder in ONE persistent launch (sm_90,
Gluon): the batch-1 kernel's plan (decode_step_kernel.py) with every GEMV on tensor cores over the rows
(decode_rows_stream.py). Launched by decode_rows.py. Not yet run on a GPU: see benchmarks/RESULTS.md.

The rows are the step's first M tokens whose slot is not negative (a CUDA-graph bucket pads with
negative slots). Grid counters, one per stage, in order:

    init: h[rows] = embedding of each row's token
    per layer: q/k/v GEMV (norm 1) -> attention (no weights; one (row, q head) task at a time)
               -> o GEMV (+ h) -> gate/up GEMV (norm 2; SiLU(gate) x up to g) -> down GEMV (+ h)
    lm_head GEMV (final norm) -> logits [MB, V] fp32 and each row's greedy token

Down's K is the MLP width: its chunks come slice by slice (2,048 columns of g staged at a time, every
tile of this program per slice), with the tiles' partial sums in shared memory. It reads W_down as the
model stores it ([H, I] per layer), not the batch-1 kernel's transposed copy.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.decode_rows_stream import BOXK, Q
from ascend_kernels.decode_rows_stream import chunk_out as _chunk_out
from ascend_kernels.decode_rows_stream import down_rows as _down_rows
from ascend_kernels.decode_rows_stream import gate_up_rows as _gate_up_rows
from ascend_kernels.decode_rows_stream import gemv_rows as _gemv_rows
from ascend_kernels.decode_rows_stream import issue_chunk as _issue
from ascend_kernels.decode_rows_stream import issue_layer as _issue_layer
from ascend_kernels.decode_rows_stream import num_tiles as _num_tiles
from ascend_kernels.decode_rows_stream import release_ring as _release_ring
from ascend_kernels.decode_rows_stream import rows_smem as _rows_smem
from ascend_kernels.decode_rows_stream import stage_rows as _stage
from ascend_kernels.decode_step_attention import attention_rows
from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import smem_view as _view
from ascend_kernels.grid_sync import signal_stage, wait_stage

STAGES = gl.constexpr(5)  # grid counters per layer


@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, ids_ptr, pos_ptr, slot_ptr, bt_ptr, bt_stride, T, h_ptr,
            qkv_ptr, attn_ptr, g_ptr, logits_ptr, n1_ptr, n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr,
            inv_freq_ptr, embed_ptr, cnt_ptr, tokens_out_ptr, best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale,
            layer_stride, G, ring, xs, dp, ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr,
            V: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr,
            TILE: gl.constexpr, MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    pid = gl.program_id(0)
    i = 0
    for layer in range(NL):
        i = _issue_layer(wq_desc, wo_desc, wg_desc, wd_desc, layer, i, ring, ready, empty, G, NQ, H, I, BN, NB, NBUF)
    for j in range(_num_tiles(V, BN, G)):
        _issue(wl_desc, (pid + j * G) * BN, 0, i, ring, ready, empty, NB, BN, NBUF)
        i += 1


@gluon.jit
def num_rows(slot_ptr, T, MB: gl.constexpr, NB: gl.constexpr):
    """The step's rows: the leading tokens whose slot is not negative (at most MB)."""
    r = gl.arange(0, MB, layout=gl.BlockedLayout([1], [32], [NB], [0]))
    return gl.sum((gl.load(slot_ptr + r, mask=r < T, other=-1) >= 0).to(gl.int32), axis=0)


@gluon.jit
def _finish(best_v, best_i, best_val_ptr, best_idx_ptr, cnt_ptr, tokens_out_ptr, M, G, NC: gl.constexpr,
            V: gl.constexpr, MB: gl.constexpr, NB: gl.constexpr, OUT: gl.constexpr):
    """Each row's greedy token (first index of the maximum, like torch.argmax without NaN) from the
    programs' per-row bests, by the last program to arrive; it also zeroes the counters."""
    top = gl.max(best_v, axis=1)
    idx = gl.min(gl.where(best_v == gl.expand_dims(top, 1), best_i, V), axis=1)
    mr = gl.arange(0, MB, layout=gl.SliceLayout(1, OUT))
    pid = gl.program_id(0)
    gl.store(best_val_ptr + pid * MB + mr, top)
    gl.store(best_idx_ptr + pid * MB + mr, idx)
    _barrier()
    if gl.atomic_add(cnt_ptr + NC - 1, 1, sem="acq_rel") == G - 1:  # every other program is done
        LP: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [NB, 1], [1, 0])
        p = gl.expand_dims(gl.arange(0, 32 * NB, layout=gl.SliceLayout(1, LP)), 1)
        m = gl.expand_dims(gl.arange(0, MB, layout=gl.SliceLayout(0, LP)), 0)
        vals = gl.load(best_val_ptr + p * MB + m, mask=p < G, other=float("-inf"), cache_modifier=".cg")
        idxs = gl.load(best_idx_ptr + p * MB + m, mask=p < G, other=V, cache_modifier=".cg")
        best = gl.max(vals, axis=0)
        token = gl.min(gl.where(vals == gl.expand_dims(best, 0), idxs, V), axis=0)
        mm = gl.arange(0, MB, layout=gl.SliceLayout(0, LP))
        gl.store(tokens_out_ptr + mm, token.to(gl.int64), mask=mm < M)
        c = gl.arange(0, 32 * NB, layout=gl.SliceLayout(1, LP))
        gl.store(cnt_ptr + c, gl.zeros_like(c), mask=c < NC)


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, ids_ptr, pos_ptr, slot_ptr, bt_ptr, bt_stride, T, h_ptr,
             qkv_ptr, attn_ptr, g_ptr, logits_ptr, n1_ptr, n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr,
             inv_freq_ptr, embed_ptr, cnt_ptr, tokens_out_ptr, best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale,
             layer_stride, G, ring, xs, dp, ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr,
             V: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr,
             TILE: gl.constexpr, MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    NC: gl.constexpr = 1 + STAGES * NL + 1
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NB, 1, 1], instr_shape=[1, 16, 8])
    OUT: gl.constexpr = gl.SliceLayout(0, MMA)
    ringv = _view(ring, gl.bfloat16, [NBUF * Q, NB, BN, BOXK], gl.NVMMASharedLayout(128, 16, rank=3))
    pid = gl.program_id(0)
    M = num_rows(slot_ptr, T, MB, NB)
    m2 = gl.expand_dims(gl.arange(0, MB, layout=gl.SliceLayout(1, OUT)), 1)  # [MB, 1]
    n2 = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, OUT)), 0)  # [1, BN]
    ok = (m2 < M) & (n2 >= 0)
    tok = gl.load(ids_ptr + m2, mask=m2 < M, other=0).to(gl.int64)
    for j in range(_num_tiles(H, BN, G)):  # the residual rows this program owns: the tokens' embeddings
        rows = (pid + j * G) * BN + n2
        gl.store(h_ptr + m2 * H + rows, gl.load(embed_ptr + tok * H + rows, mask=ok, other=0.0).to(gl.float32),
                 mask=ok)
    signal_stage(cnt_ptr, 0)
    i = 0
    for layer in range(NL):
        ci = 1 + STAGES * layer
        wait_stage(cnt_ptr, ci - 1, G)
        _barrier()  # the previous stage's last chunk has read xs
        rs = gl.expand_dims(_stage(xs, h_ptr, H, 0, n1_ptr + layer * H, eps, M, True, H, MB, NB), 1)
        _barrier()
        i = _gemv_rows(ringv, xs, ready, empty, i, NQ, qkv_ptr, rs, m2, n2, ok, G, False, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, ci)
        attention_rows(layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, slot_ptr,
                       inv_freq_ptr, rope_scale, qk_scale, layer_stride, cnt_ptr, ci, G, M, NQH, NKV, D, BS, TILE, NB)
        signal_stage(cnt_ptr, ci + 1)
        wait_stage(cnt_ptr, ci + 1, G)
        _barrier()
        rs = gl.expand_dims(_stage(xs, attn_ptr, H, 0, n1_ptr, eps, M, False, H, MB, NB), 1)  # ones
        _barrier()
        i = _gemv_rows(ringv, xs, ready, empty, i, H, h_ptr, rs, m2, n2, ok, G, True, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, ci + 2)
        wait_stage(cnt_ptr, ci + 2, G)
        _barrier()
        rs = gl.expand_dims(_stage(xs, h_ptr, H, 0, n2_ptr + layer * H, eps, M, True, H, MB, NB), 1)
        _barrier()
        i = _gate_up_rows(ringv, xs, ready, empty, i, g_ptr, rs, m2, n2, ok, G, I, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, ci + 3)
        wait_stage(cnt_ptr, ci + 3, G)
        i = _down_rows(ringv, xs, dp, ready, empty, i, g_ptr, h_ptr, eps, M, m2, n2, ok, G, H, I, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, ci + 4)
    wait_stage(cnt_ptr, STAGES * NL, G)
    _barrier()
    rs = gl.expand_dims(_stage(xs, h_ptr, H, 0, nf_ptr, eps, M, True, H, MB, NB), 1)
    _barrier()
    best_v = gl.full([MB, BN], float("-inf"), gl.float32, OUT)  # per row and row slot: tiles come in row
    best_i = gl.zeros([MB, BN], gl.int32, OUT)  # order, so a strict > keeps each slot's first maximal index
    for j in range(_num_tiles(V, BN, G)):
        rows = (pid + j * G) * BN + n2
        out = _chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF) * rs
        gl.store(logits_ptr + m2 * V + rows, out, mask=ok)
        best_i = gl.where(out > best_v, rows, best_i)
        best_v = gl.maximum(out, best_v)
        i += 1
    _finish(best_v, best_i, best_val_ptr, best_idx_ptr, cnt_ptr, tokens_out_ptr, M, G, NC, V, MB, NB, OUT)


@gluon.jit
def decode_rows_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc, wl_desc,  # TMA, box [BN, 64], 128B swizzle: q;k;v, o, gate;up, down, lm
    ids_ptr, pos_ptr, slot_ptr,  # [T] int64: the step's token ids, positions, KV slots (negative: padding)
    bt_ptr,  # [>= M, bt_stride] int32 block tables
    bt_stride, T,
    h_ptr,  # [MB, H] fp32 scratch: the residual stream
    qkv_ptr,  # [MB, NQ] fp32 scratch
    attn_ptr,  # [MB, NQH * D] bf16 scratch: attention output (the o GEMV takes it as bf16 anyway)
    g_ptr,  # [MB, I] bf16 scratch: SiLU(gate) x up (likewise the down GEMV's input)
    logits_ptr,  # [MB, V] fp32
    n1_ptr, n2_ptr, nf_ptr,  # [NL, H], [NL, H], [H] bf16 norm weights
    k_cache_ptr, v_cache_ptr,  # [NL, num_blocks, BS, NKV, D] bf16
    inv_freq_ptr,  # [D / 2] fp32
    embed_ptr,  # [V, H] bf16
    cnt_ptr,  # [1 + 5 NL + 1] int32 grid counters, zero at launch (and left zero)
    tokens_out_ptr,  # [MB] int64: each row's greedy token
    best_val_ptr, best_idx_ptr,  # [G, MB] fp32 / int32 per-program bests
    eps, rope_scale, qk_scale, layer_stride, G,
    NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr,
    D: gl.constexpr, BS: gl.constexpr, TILE: gl.constexpr, MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr,
    NBUF: gl.constexpr, MAXT: gl.constexpr,
):
    ring, xs, dp, ready, empty = _rows_smem(MB, BN, NB, NBUF, MAXT)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, ids_ptr, pos_ptr, slot_ptr, bt_ptr, bt_stride, T,
                    h_ptr, qkv_ptr, attn_ptr, g_ptr, logits_ptr, n1_ptr, n2_ptr, nf_ptr, k_cache_ptr,
                    v_cache_ptr, inv_freq_ptr, embed_ptr, cnt_ptr, tokens_out_ptr, best_val_ptr, best_idx_ptr, eps,
                    rope_scale, qk_scale, layer_stride, G, ring, xs, dp, ready, empty,
                    NL, H, I, V, NQH, NKV, D, BS, TILE, MB, BN, NB, NBUF)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, ids_ptr, pos_ptr, slot_ptr, bt_ptr, bt_stride, T,
                   h_ptr, qkv_ptr, attn_ptr, g_ptr, logits_ptr, n1_ptr, n2_ptr, nf_ptr, k_cache_ptr,
                   v_cache_ptr, inv_freq_ptr, embed_ptr, cnt_ptr, tokens_out_ptr, best_val_ptr, best_idx_ptr, eps,
                   rope_scale, qk_scale, layer_stride, G, ring, xs, dp, ready, empty,
                   NL, H, I, V, NQH, NKV, D, BS, TILE, MB, BN, NB, NBUF)),
    ], [1], [48])
    _release_ring(ready, empty, NBUF)
