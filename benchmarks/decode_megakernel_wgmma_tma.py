"""The swap-AB wgmma probe (decode_megakernel_wgmma.py) with its activations staged by TMA: the
third batch-16 try for issue 6. That probe streams its weights at the floor when nothing else runs
(658 us for 656 on an H100), but staging the 16 activation rows costs ~21 us a layer: every program
reads them from L2 into registers (fp32 for the residual), applies the norm weights and stores bf16
into shared memory, box after box.

Here each stage's producer writes what the next stage reads in bf16, ready to be copied: q and
SiLU(gate) x up as before, and a bf16 shadow `hb` of the fp32 residual, written by the programs
that finish its rows. A stage's input is then 32 TMA boxes [16, 64] into xs behind one mbarrier;
RMSNorm's weights are folded into the q/k/v and gate/up weights on the host (W * w_norm, column
by column: RMSNorm(h) @ W^T = rs * (h @ (W * w_norm)^T)), and each row's 1 / rms is summed from
xs once the copy lands.

The down projection's K slices (4 per 64-row tile) no longer add into h with atomics: each slice
stores its partial and the tile's last slice to arrive sums the 4 in slice order, adds them to h
and writes h and hb (deterministic; a counter per tile, left zero).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.grid_sync import signal_stage, wait_stage
from ascend_kernels.rows_wgmma_stages import down_stage, gate_up_stage, o_stage, qkv_stage, release_smem, stream_smem
from ascend_kernels.rows_wgmma_stream import (
    BN, KS, issue_item, items, lm_place, lm_tiles, pick_tokens, places, stage_tma, stream_weights,
)  # fmt: skip


# _loader and _compute take one signature: warp_specialize hands both partitions the same arguments
@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
            part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready, empty,
            xbar, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr,
            NBUF: gl.constexpr, BALANCE: gl.constexpr, V: gl.constexpr):
    i = stream_weights(wq_desc, wo_desc, wg_desc, wd_desc, G, ring, ready, empty, NL, H, I, NQ, NBUF, BALANCE)
    if V > 0:
        pe = lm_place(G, NQ, H, I, BALANCE)
        for j in range(items(V // BN, G, pe)):
            i = issue_item(wl_desc, (pe + j * G) * BN, 0, i, ring, ready, empty, NBUF)


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
             part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready, empty,
             xbar, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr,
             NBUF: gl.constexpr, BALANCE: gl.constexpr, V: gl.constexpr):
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, MB, 16])
    ROWS: gl.constexpr = gl.SliceLayout(0, ACC)  # along the batch (acc columns)
    pa, pb, pc, pd = places(G, NQ, H, I, BALANCE)
    r2 = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, ACC)), 1)  # [64, 1] tile row
    m2 = gl.expand_dims(gl.arange(0, MB, layout=ROWS), 0)  # [1, MB] batch row
    ok = (m2 < M) & (r2 >= 0)
    zero = gl.zeros([BN, MB], gl.float32, ACC)
    i = 0
    nx = 0
    for layer in range(NL):
        c0 = layer * 4
        i, nx = qkv_stage(i, nx, pa, G, c0 - 1, xh_desc, q_ptr, NQ, xs, xbar, ring, ready, empty, cnt_ptr, eps, zero,
                          r2, m2, ok, MB, NBUF, ROWS)  # A: q/k/v (norm 1 folded into the weights)
        signal_stage(cnt_ptr, c0)
        i, nx = o_stage(i, nx, pb, G, c0, xq_desc, h_ptr, hb_ptr, H, xs, xbar, ring, ready, empty, cnt_ptr, eps, zero,
                        r2, m2, ok, MB, NBUF, ROWS)  # B: o, into the residual and its shadow
        signal_stage(cnt_ptr, c0 + 1)
        i, nx = gate_up_stage(i, nx, pc, G, c0 + 1, xh_desc, g_ptr, I, xs, xbar, ring, ready, empty, cnt_ptr, eps,
                              zero, r2, m2, ok, MB, NBUF, ROWS)  # C: gate/up (norm 2 folded into the weights)
        signal_stage(cnt_ptr, c0 + 2)
        i, nx = down_stage(i, nx, pd, G, c0 + 2, xg_desc, h_ptr, hb_ptr, part_ptr, cnt_ptr + 4 * NL, H, I, xs, xbar,
                           ring, ready, empty, cnt_ptr, eps, zero, r2, m2, ok, MB, NBUF, ROWS)  # D: down
        signal_stage(cnt_ptr, c0 + 3)
    if V > 0:  # E: lm_head (final norm folded into the weights) and each row's greedy token
        wait_stage(cnt_ptr, 4 * NL - 1, G)
        rs, nx = stage_tma(xs, xbar, nx, xh_desc, 0, eps, cnt_ptr, True, MB, ROWS)
        best_v, best_i, i = lm_tiles(i, lm_place(G, NQ, H, I, BALANCE), G, rs, ring, xs, ready, empty, logits_ptr,
                                     zero, r2, m2, ok, V, NBUF, MB, ROWS)
        pick_tokens(best_v, best_i, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr + 4 * NL + H // BN, G, M, V,
                    MB, ROWS, cnt_ptr, 0)  # the host zeroes the grid counters before each launch


@gluon.jit
def decode_megakernel_wgmma_tma_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc,  # TMA over [NL * N, K] bf16, box [64, 64], 128B swizzle (q/k/v and
                                         # gate/up with the norm weights folded in)
    wl_desc,  # TMA over the lm_head [V, H] bf16 with the final norm folded in (read only when V > 0)
    xq_desc, xh_desc, xg_desc,  # TMA over q_ptr, hb_ptr, g_ptr: box [MB, 64], 128B swizzle
    h_ptr,  # [MB, H] fp32 residual stream (rows < M: in / out)
    hb_ptr,  # [MB, H] bf16 its shadow (rows < M: the input's, on entry; rows >= M zero)
    q_ptr,  # [MB, NQ] bf16 scratch: q/k/v (rows >= M zero)
    g_ptr,  # [MB, I] bf16 scratch: SiLU(gate) x up (rows >= M zero)
    part_ptr,  # [H / 64 * I / 2048, 64, MB] fp32 down partials
    logits_ptr,  # [MB, V] fp32 (V > 0)
    best_val_ptr, best_idx_ptr,  # [G, MB] fp32 / int32 each program's best logit per row (V > 0)
    tokens_ptr,  # [MB] int64 greedy tokens (V > 0)
    cnt_ptr,  # [NL * 4 + H / 64 + 1] int32 grid counters, down-tile arrivals, lm_head arrivals; zero at launch
    eps, G, M,
    NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr, NBUF: gl.constexpr,
    BALANCE: gl.constexpr = 1,  # each stage's deal starts where the previous one ended
    V: gl.constexpr = 0,  # vocabulary: > 0 adds the lm_head and the greedy tokens
):
    gl.static_assert(H == KS)  # every item's K slice is the hidden size (down's K is cut into such slices)
    ring, xs, ready, empty, xbar = stream_smem(MB, NBUF)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
                    part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready,
                    empty, xbar, NL, H, I, NQ, MB, NBUF, BALANCE, V)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
                   part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready,
                   empty, xbar, NL, H, I, NQ, MB, NBUF, BALANCE, V)),
    ], [1], [48])
    release_smem(ready, empty, xbar, NBUF)
