"""A decode step of up to MB = 16 requests of a Llama-style decoder in ONE persistent launch (sm_90,
Gluon), on the swap-AB wgmma stream (rows_wgmma_stream.py): the multi-row kernel's plan
(decode_rows_kernel.py) with the GEMVs of the TMA-staged probe that ran 16 layers at 1.18x Inductor +
cuBLAS on an H100 (benchmarks/RESULTS.md, nineteenth session). Launched by decode_rows_wgmma.py.

The rows are the step's first M tokens whose slot is not negative (a CUDA-graph bucket pads with
negative slots). Grid counters in order (each stage's producer writes the next stage's input in bf16,
which the consumers copy into shared memory by TMA):

    init: h[rows] (fp32) and its bf16 shadow hb = embedding of each row's token
    init: also each row's RoPE factors (rope_rows)
    per layer: A q/k/v (norm 1 folded into W; the programs without q/k/v items pull the layer's cached
               K/V into L2 meanwhile)  ->  attention ((row, KV head) tasks on tensor cores, RoPE, the
               new K/V into the cache; out attn bf16; rows_attention.py)  ->  B o (h, hb += ...)  ->
               C gate/up (norm 2 folded into W; g = SiLU(gate) x up bf16)  ->  D down (4 K slices a
               tile; the last adds into h, hb)
    lm_head (final norm staged through registers) -> logits [MB, V] fp32 and each row's greedy token
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.decode_rows_kernel import num_rows
from ascend_kernels.grid_sync import signal_stage, wait_stage
from ascend_kernels.rows_attention import attention_groups, kv_prefetch, rope_rows
from ascend_kernels.rows_wgmma_stages import down_stage, gate_up_stage, o_stage, qkv_stage, release_smem, stream_smem
from ascend_kernels.rows_wgmma_stream import (
    BN, KS, issue_item, items, lm_place, lm_tiles, pick_tokens, places, stage_regs, stream_weights,
)  # fmt: skip

STAGES = gl.constexpr(5)  # grid counters per layer


@gluon.jit
def _embed_rows(ids_ptr, embed_ptr, h_ptr, hb_ptr, G, M, r2, m2, ok, H: gl.constexpr):
    """h and hb at this program's column tiles of every row: the row's token embedding."""
    tok = gl.load(ids_ptr + m2, mask=m2 < M, other=0).to(gl.int64)
    for j in range(items(H // BN, G, gl.program_id(0))):
        cols = (gl.program_id(0) + j * G) * BN + r2
        e = gl.load(embed_ptr + tok * H + cols, mask=ok, other=0.0)
        gl.store(h_ptr + m2 * H + cols, e.to(gl.float32), mask=ok)
        gl.store(hb_ptr + m2 * H + cols, e, mask=ok)


# _loader and _compute take one signature: warp_specialize hands both partitions the same arguments
@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xa_desc, xh_desc, xg_desc, ids_ptr, pos_ptr, slot_ptr,
            bt_ptr, bt_stride, T, h_ptr, hb_ptr, qkv_ptr, attn_ptr, g_ptr, part_ptr, logits_ptr, nf_ptr,
            k_cache_ptr, v_cache_ptr, inv_freq_ptr, rope_ptr, embed_ptr, cnt_ptr, tokens_out_ptr, best_val_ptr,
            best_idx_ptr, eps, rope_scale, qk_scale, layer_stride, G, ring, xs, ready, empty, xbar, NL: gl.constexpr,
            H: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr,
            D: gl.constexpr, BS: gl.constexpr, TILE: gl.constexpr, MB: gl.constexpr, NBUF: gl.constexpr,
            LOOP: gl.constexpr):
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    i = stream_weights(wq_desc, wo_desc, wg_desc, wd_desc, G, ring, ready, empty, NL, H, I, NQ, NBUF, 1)
    pe = lm_place(G, NQ, H, I, 1)
    for j in range(items(V // BN, G, pe)):
        i = issue_item(wl_desc, (pe + j * G) * BN, 0, i, ring, ready, empty, NBUF)


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xa_desc, xh_desc, xg_desc, ids_ptr, pos_ptr, slot_ptr,
             bt_ptr, bt_stride, T, h_ptr, hb_ptr, qkv_ptr, attn_ptr, g_ptr, part_ptr, logits_ptr, nf_ptr,
             k_cache_ptr, v_cache_ptr, inv_freq_ptr, rope_ptr, embed_ptr, cnt_ptr, tokens_out_ptr, best_val_ptr,
             best_idx_ptr, eps, rope_scale, qk_scale, layer_stride, G, ring, xs, ready, empty, xbar, NL: gl.constexpr,
             H: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr,
             D: gl.constexpr, BS: gl.constexpr, TILE: gl.constexpr, MB: gl.constexpr, NBUF: gl.constexpr,
             LOOP: gl.constexpr):
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, MB, 16])
    ROWS: gl.constexpr = gl.SliceLayout(0, ACC)  # along the batch (acc columns)
    M = num_rows(slot_ptr, T, MB, 4)  # the compute partition's 4 warps
    pa, pb, pc, pd = places(G, NQ, H, I, 1)
    r2 = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, ACC)), 1)  # [64, 1] tile row
    m2 = gl.expand_dims(gl.arange(0, MB, layout=ROWS), 0)  # [1, MB] batch row
    ok = (m2 < M) & (r2 >= 0)
    zero = gl.zeros([BN, MB], gl.float32, ACC)
    _embed_rows(ids_ptr, embed_ptr, h_ptr, hb_ptr, G, M, r2, m2, ok, H)
    rope_rows(pos_ptr, inv_freq_ptr, rope_ptr, rope_scale, G, M, D)
    signal_stage(cnt_ptr, 0)
    i = 0
    nx = 0
    for layer in range(NL):
        c = 1 + STAGES * layer
        # the programs without q/k/v items (q/k/v goes to programs 0 .. NQ / BN - 1: pa is the program id) pull
        # this layer's cached K/V into L2 meanwhile
        kv_prefetch(layer, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, layer_stride, M, G, NQ // BN, NKV, D,
                    BS)
        i, nx = qkv_stage(i, nx, pa, G, c - 1, xh_desc, qkv_ptr, NQ, xs, xbar, ring, ready, empty, cnt_ptr, eps,
                          zero, r2, m2, ok, MB, NBUF, ROWS)  # A: q/k/v
        signal_stage(cnt_ptr, c)
        attention_groups(layer, qkv_ptr, attn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, bt_stride, pos_ptr, slot_ptr,
                         rope_ptr, qk_scale, layer_stride, cnt_ptr, c, G, M, NQH, NKV, D, BS, TILE)
        signal_stage(cnt_ptr, c + 1)
        i, nx = o_stage(i, nx, pb, G, c + 1, xa_desc, h_ptr, hb_ptr, H, xs, xbar, ring, ready, empty, cnt_ptr, eps,
                        zero, r2, m2, ok, MB, NBUF, ROWS)  # B: o, into the residual and its shadow
        signal_stage(cnt_ptr, c + 2)
        i, nx = gate_up_stage(i, nx, pc, G, c + 2, xh_desc, g_ptr, I, xs, xbar, ring, ready, empty, cnt_ptr, eps, zero,
                              r2, m2, ok, MB, NBUF, ROWS)  # C: gate/up
        signal_stage(cnt_ptr, c + 3)
        i, nx = down_stage(i, nx, pd, G, c + 3, xg_desc, h_ptr, hb_ptr, part_ptr, cnt_ptr + 1 + STAGES * NL, H, I, xs,
                           xbar, ring, ready, empty, cnt_ptr, eps, zero, r2, m2, ok, MB, NBUF, ROWS)  # D: down
        signal_stage(cnt_ptr, c + 4)
    wait_stage(cnt_ptr, STAGES * NL, G)  # lm_head: the final norm through registers (its weight is not folded)
    rs = stage_regs(xs, h_ptr, H, 0, nf_ptr, eps, M, True, MB, ROWS)
    best_v, best_i, i = lm_tiles(i, lm_place(G, NQ, H, I, 1), G, rs, ring, xs, ready, empty, logits_ptr, zero, r2,
                                 m2, ok, V, NBUF, MB, ROWS)
    pick_tokens(best_v, best_i, best_val_ptr, best_idx_ptr, tokens_out_ptr, cnt_ptr + 1 + STAGES * NL + H // BN, G,
                M, V, MB, ROWS, cnt_ptr, 1 + STAGES * NL, LOOP, ids_ptr, pos_ptr, slot_ptr, bt_ptr, bt_stride, BS)


@gluon.jit
def decode_rows_wgmma_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc, wl_desc,  # TMA, box [64, 64], 128B swizzle: q;k;v and gate;up with the
                                                  # norm weights folded in, o, down as stored ([H, I] a layer), lm
    xa_desc, xh_desc, xg_desc,  # TMA over attn_ptr, hb_ptr, g_ptr: box [MB, 64], 128B swizzle
    ids_ptr, pos_ptr, slot_ptr,  # [T] int64: the step's token ids, positions, KV slots (negative: padding);
                                 # written for the next launch with LOOP
    bt_ptr,  # [>= M, bt_stride] int32 block tables
    bt_stride, T,
    h_ptr,  # [MB, H] fp32 scratch: the residual stream
    hb_ptr,  # [MB, H] bf16 scratch: its shadow (rows >= M stay zero)
    qkv_ptr,  # [MB, NQ] bf16 scratch
    attn_ptr,  # [MB, NQH * D] bf16 scratch: attention output (rows >= M stay zero)
    g_ptr,  # [MB, I] bf16 scratch: SiLU(gate) x up (rows >= M stay zero)
    part_ptr,  # [H / 64 * I / 2048, 64, MB] fp32 down partials
    logits_ptr,  # [MB, V] fp32
    nf_ptr,  # [H] bf16 final norm
    k_cache_ptr, v_cache_ptr,  # [NL, num_blocks, BS, NKV, D] bf16
    inv_freq_ptr,  # [D / 2] fp32
    rope_ptr,  # [MB, 2, D] fp32 scratch: each row's RoPE factors (rope_rows)
    embed_ptr,  # [V, H] bf16
    cnt_ptr,  # [1 + 5 NL + H / 64 + 1] int32 grid counters, down-tile and lm_head arrivals; zero (and left zero)
    tokens_out_ptr,  # [MB] int64: each row's greedy token
    best_val_ptr, best_idx_ptr,  # [G, MB] fp32 / int32 per-program bests
    eps, rope_scale, qk_scale, layer_stride, G,
    NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr,
    D: gl.constexpr, BS: gl.constexpr, TILE: gl.constexpr, MB: gl.constexpr, NBUF: gl.constexpr,
    LOOP: gl.constexpr = 0,  # a burst's launch: rows' tokens, positions and slots feed the next (pick_tokens)
):
    gl.static_assert(H == KS)  # every item's K slice is the hidden size (down's K is cut into such slices)
    ring, xs, ready, empty, xbar = stream_smem(MB, NBUF)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xa_desc, xh_desc, xg_desc, ids_ptr, pos_ptr,
                    slot_ptr, bt_ptr, bt_stride, T, h_ptr, hb_ptr, qkv_ptr, attn_ptr, g_ptr, part_ptr, logits_ptr,
                    nf_ptr, k_cache_ptr, v_cache_ptr, inv_freq_ptr, rope_ptr, embed_ptr, cnt_ptr, tokens_out_ptr,
                    best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale, layer_stride, G, ring, xs, ready, empty,
                    xbar, NL, H, I, V, NQH, NKV, D, BS, TILE, MB, NBUF, LOOP)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xa_desc, xh_desc, xg_desc, ids_ptr, pos_ptr,
                   slot_ptr, bt_ptr, bt_stride, T, h_ptr, hb_ptr, qkv_ptr, attn_ptr, g_ptr, part_ptr, logits_ptr,
                   nf_ptr, k_cache_ptr, v_cache_ptr, inv_freq_ptr, rope_ptr, embed_ptr, cnt_ptr, tokens_out_ptr,
                   best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale, layer_stride, G, ring, xs, ready, empty, xbar,
                   NL, H, I, V, NQH, NKV, D, BS, TILE, MB, NBUF, LOOP)),
    ], [1], [48])
    release_smem(ready, empty, xbar, NBUF)
