"""The GEMV stages of a layer on the swap-AB wgmma stream (rows_wgmma_stream.py) with TMA-staged inputs, as
the TMA probe (benchmarks/decode_megakernel_wgmma_tma.py) and the multi-row step kernel
(decode_rows_wgmma_kernel.py) run them, and the shared memory they share.

Each stage waits for counter `done` (none when negative), stages its input, runs its items at deal place
p and returns the next ring position and staging number; the caller signs the stage's counter.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.grid_sync import wait_stage
from ascend_kernels.rows_wgmma_stream import BN, BOXK, CB, KS, down_tile, item_chunks, items, stage_tma


@gluon.jit
def stream_smem(MB: gl.constexpr, NBUF: gl.constexpr):
    """The shared memory of a swap-AB stream kernel, barriers initialised: the TMA ring (NBUF chunks of 4
    boxes), the staged rows xs and their copy barrier xbar."""
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF * CB, BN, BOXK], gl.NVMMASharedLayout(128, 16, rank=2))
    xs = gl.allocate_shared_memory(gl.bfloat16, [KS // BOXK, MB, BOXK], gl.NVMMASharedLayout(128, 16, rank=2))
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    xbar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(NBUF):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    mbarrier.init(xbar.index(0), count=1)
    return ring, xs, ready, empty, xbar


@gluon.jit
def release_smem(ready, empty, xbar, NBUF: gl.constexpr):
    """Invalidate stream_smem's barriers once the partitions are done."""
    for b in gl.static_range(NBUF):
        mbarrier.invalidate(ready.index(b))
        mbarrier.invalidate(empty.index(b))
    mbarrier.invalidate(xbar.index(0))


@gluon.jit
def qkv_stage(i, nx, p, G, done, x_desc, q_ptr, NQ: gl.constexpr, xs, xbar, ring, ready, empty, cnt_ptr, eps, zero,
              r2, m2, ok, MB: gl.constexpr, NBUF: gl.constexpr, ROWS: gl.constexpr):
    """q/k/v = RMSNorm(h) @ W^T (norm weight folded into W): the row scales times the products, bf16."""
    if items(NQ // BN, G, p) > 0:
        if done >= 0:
            wait_stage(cnt_ptr, done, G)
        rs, nx = stage_tma(xs, xbar, nx, x_desc, 0, eps, cnt_ptr, True, MB, ROWS)
        for j in range(items(NQ // BN, G, p)):
            acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
            gl.store(q_ptr + m2 * NQ + (p + j * G) * BN + r2, acc * gl.expand_dims(rs, 0), mask=ok)
    return i, nx


@gluon.jit
def o_stage(i, nx, p, G, done, x_desc, h_ptr, hb_ptr, H: gl.constexpr, xs, xbar, ring, ready, empty, cnt_ptr, eps,
            zero, r2, m2, ok, MB: gl.constexpr, NBUF: gl.constexpr, ROWS: gl.constexpr):
    """h += attention output @ W_o^T, and h's bf16 shadow (each tile's rows belong to one program)."""
    if items(H // BN, G, p) > 0:
        wait_stage(cnt_ptr, done, G)
        rs, nx = stage_tma(xs, xbar, nx, x_desc, 0, eps, cnt_ptr, False, MB, ROWS)
        for j in range(items(H // BN, G, p)):
            acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
            dst = m2 * H + (p + j * G) * BN + r2
            hn = gl.load(h_ptr + dst, mask=ok, other=0.0, cache_modifier=".cg") + acc
            gl.store(h_ptr + dst, hn, mask=ok)
            gl.store(hb_ptr + dst, hn.to(gl.bfloat16), mask=ok)
    return i, nx


@gluon.jit
def gate_up_stage(i, nx, p, G, done, x_desc, g_ptr, I: gl.constexpr, xs, xbar, ring, ready, empty, cnt_ptr, eps,
                  zero, r2, m2, ok, MB: gl.constexpr, NBUF: gl.constexpr, ROWS: gl.constexpr):
    """g = SiLU(gate) x up of RMSNorm(h) (norm weight folded into W), bf16."""
    if items(I // BN, G, p) > 0:
        wait_stage(cnt_ptr, done, G)
        rs, nx = stage_tma(xs, xbar, nx, x_desc, 0, eps, cnt_ptr, True, MB, ROWS)
        rs2 = gl.expand_dims(rs, 0)
        for j in range(items(I // BN, G, p)):
            gate, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
            up, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
            gate = gate * rs2
            gl.store(g_ptr + m2 * I + (p + j * G) * BN + r2, gate / (1.0 + gl.exp(-gate)) * (up * rs2), mask=ok)
    return i, nx


@gluon.jit
def down_stage(i, nx, p, G, done, x_desc, h_ptr, hb_ptr, part_ptr, tile_cnt_ptr, H: gl.constexpr, I: gl.constexpr,
               xs, xbar, ring, ready, empty, cnt_ptr, eps, zero, r2, m2, ok, MB: gl.constexpr, NBUF: gl.constexpr,
               ROWS: gl.constexpr):
    """h += g @ W_down^T in I / KS K slices a tile, each tile finished by its last slice (down_tile)."""
    NS: gl.constexpr = I // KS
    if items((H // BN) * NS, G, p) > 0:
        wait_stage(cnt_ptr, done, G)
        for j in range(items((H // BN) * NS, G, p)):
            t = p + j * G
            rs, nx = stage_tma(xs, xbar, nx, x_desc, (t % NS) * KS, eps, cnt_ptr, False, MB, ROWS)
            acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
            down_tile(acc, t, h_ptr, hb_ptr, part_ptr, tile_cnt_ptr, r2, m2, ok, H, NS, MB)
    return i, nx
