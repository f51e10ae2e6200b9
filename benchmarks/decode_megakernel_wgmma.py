"""A batch-16 probe of a persistent decode kernel for issue 6 (H100 batch 16), the second try: the 16
Llama-3.2-1B layers WITHOUT attention at up to MB = 16 rows in ONE launch, the GEMVs as Hopper
`wgmma` with the operands swapped (swap-AB): the weight tile is the 64-row A operand, read by the
tensor cores straight from the TMA ring, and the 16 activation rows are the N = 16 B operand.

The first try (decode_megakernel_mma.py, `mma_v2`) split every chunk's K over its 8 warps, so each
32 KB chunk ended in a cross-warp reduction through shared memory; it streamed at 38% of the floor
(benchmarks/RESULTS.md, fourteenth session). Here one warpgroup owns a whole 64-row tile and its
accumulator [64, 16] stays in registers across the tile's chunks: nothing is reduced across warps.

    chunk (32 KB):  W[row .. row + 63, k0 .. k0 + 255]  as 4 TMA boxes [64, 64] (128-byte swizzle)
    xs (64 KB):     the staged activations [16, 2048] bf16 as 32 boxes [16, 64]
    per chunk:      acc[64, 16] += box_b @ xs[kb + b]^T      (4 wgmma m64n16k16 x 4 k-steps)

An item is one tile over a 2,048-wide K slice (8 chunks). Per layer, each stage's items are dealt
round-robin to the G programs and every stage ends with a grid counter:
    A  q/k/v   48 items (K = H)        input RMSNorm1(h)      q = acc^T * rs
    B  o       32 items                input q[:, :H]         h[:, tile] += acc^T (each tile one program)
    C  gate/up 128 items (gate tile, then the same rows of up: 16 chunks)   g = SiLU(gate) x up
    D  down    128 items: 32 tiles x 4 K slices of the MLP width            h[:, tile] += acc^T (fp32 atomics)
A program without items in a stage only signs in; its loader streams ahead into its later stages.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.grid_sync import signal_stage, wait_stage
from ascend_kernels.rows_wgmma_stages import release_smem, stream_smem
from ascend_kernels.rows_wgmma_stream import BN, KS, item_chunks, items, places, stage_regs, stream_weights


# _loader and _compute take one signature: warp_specialize hands both partitions the same arguments
@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring, xs,
            ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr,
            NBUF: gl.constexpr, SYNC: gl.constexpr, DEFER: gl.constexpr, BALANCE: gl.constexpr):
    stream_weights(wq_desc, wo_desc, wg_desc, wd_desc, G, ring, ready, empty, NL, H, I, NQ, NBUF, BALANCE)


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring, xs,
             ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr,
             NBUF: gl.constexpr, SYNC: gl.constexpr, DEFER: gl.constexpr, BALANCE: gl.constexpr):
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, MB, 16])
    ROWS: gl.constexpr = gl.SliceLayout(0, ACC)  # along the batch (acc columns)
    pa, pb, pc, pd = places(G, NQ, H, I, BALANCE)
    r2 = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, ACC)), 1)  # [64, 1] tile row
    m2 = gl.expand_dims(gl.arange(0, MB, layout=ROWS), 0)  # [1, MB] batch row
    ok = (m2 < M) & (r2 >= 0)
    zero = gl.zeros([BN, MB], gl.float32, ACC)
    i = 0
    for layer in range(NL):
        c0 = layer * 4
        if items(NQ // BN, G, pa) > 0:  # A: q/k/v
            if layer > 0 and SYNC:
                wait_stage(cnt_ptr, c0 - 1, G)
            rs = gl.expand_dims(stage_regs(xs, h_ptr, H, 0, n1_ptr + layer * H, eps, M, True, MB, ROWS), 0)
            for j in range(items(NQ // BN, G, pa)):
                acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, DEFER)
                gl.store(q_ptr + m2 * NQ + (pa + j * G) * BN + r2, acc * rs, mask=ok)
        signal_stage(cnt_ptr, c0)
        if items(H // BN, G, pb) > 0:  # B: o, into the residual
            if SYNC:
                wait_stage(cnt_ptr, c0, G)
            stage_regs(xs, q_ptr, NQ, 0, n1_ptr, eps, M, False, MB, ROWS)
            for j in range(items(H // BN, G, pb)):
                acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, DEFER)
                dst = h_ptr + m2 * H + (pb + j * G) * BN + r2
                gl.store(dst, gl.load(dst, mask=ok, other=0.0, cache_modifier=".cg") + acc, mask=ok)
        signal_stage(cnt_ptr, c0 + 1)
        if items(I // BN, G, pc) > 0:  # C: gate/up
            if SYNC:
                wait_stage(cnt_ptr, c0 + 1, G)
            rs = gl.expand_dims(stage_regs(xs, h_ptr, H, 0, n2_ptr + layer * H, eps, M, True, MB, ROWS), 0)
            for j in range(items(I // BN, G, pc)):
                gate, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, DEFER)
                up, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, DEFER)
                gate = gate * rs
                gl.store(g_ptr + m2 * I + (pc + j * G) * BN + r2, gate / (1.0 + gl.exp(-gate)) * (up * rs), mask=ok)
        signal_stage(cnt_ptr, c0 + 2)
        if items((H // BN) * (I // KS), G, pd) > 0:  # D: down, K split in I / KS slices, atomics into h
            if SYNC:
                wait_stage(cnt_ptr, c0 + 2, G)
            for j in range(items((H // BN) * (I // KS), G, pd)):
                t = pd + j * G
                stage_regs(xs, g_ptr, I, (t % (I // KS)) * KS, n1_ptr, eps, M, False, MB, ROWS)
                acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, DEFER)
                gl.atomic_add(h_ptr + m2 * H + (t // (I // KS)) * BN + r2, acc, mask=ok, sem="relaxed")
        signal_stage(cnt_ptr, c0 + 3)


@gluon.jit
def decode_megakernel_wgmma_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc,  # TMA over [NL * N, K] bf16 (q;k;v, o, gate;up, down), box [64, 64],
                                         # 128B swizzle
    h_ptr,  # [MB, H] fp32 residual stream (rows < M: in / out)
    q_ptr,  # [MB, NQ] fp32 scratch: q/k/v
    g_ptr,  # [MB, I] fp32 scratch: SiLU(gate) x up
    n1_ptr, n2_ptr,  # [NL, H] bf16 norm weights
    cnt_ptr,  # [NL * 4] int32 grid counters, zero at launch
    eps, G, M,
    NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr, NBUF: gl.constexpr,
    SYNC: gl.constexpr = 1,  # 0: no grid waits (wrong results; what streaming with this compute costs)
    DEFER: gl.constexpr = 0,  # 1: one chunk's wgmmas stay in flight while the next chunk's wait
    BALANCE: gl.constexpr = 0,  # 1: each stage's deal starts where the previous one ended (_places)
):
    gl.static_assert(H == KS)  # every item's K slice is the hidden size (down's K is cut into such slices)
    ring, xs, ready, empty, xbar = stream_smem(MB, NBUF)  # xbar: unused here (registers stage the rows)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring,
                    xs, ready, empty, NL, H, I, NQ, MB, NBUF, SYNC, DEFER, BALANCE)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring,
                   xs, ready, empty, NL, H, I, NQ, MB, NBUF, SYNC, DEFER, BALANCE)),
    ], [1], [48])
    release_smem(ready, empty, xbar, NBUF)
