"""A persistent decode "megakernel" probe for issue 6 (batch 1): the 16 Llama-3.2-1B layers WITHOUT
attention (norm -> q/k/v, o + residual, norm -> gate/up -> SiLU x up, down + residual) in ONE launch.

Not wired into the engine: it measures whether one persistent launch beats the engine's per-kernel
path (Inductor norms + cuBLAS GEMVs in a CUDA graph) on the part of a decode step that moves the
weights. `python -m benchmarks.bench_megakernel` times both in one process (benchmarks/RESULTS.md).

One CTA per SM, Hopper only (Gluon: TMA, mbarriers, warp specialisation). Every stage (one GEMV of
one layer) is cut into row tiles of BN = 8 output rows; tile t of a stage belongs to program
t mod grid. A program's weight bytes form one stream over all 64 stages, cut into 32 KB chunks:

    chunk = [NB boxes][BN rows][BOX columns]   one TMA copy per box, NB * BOX = KC columns of K

    loader warp:   for every chunk of the stream: wait empty[slot] -> TMA -> ready[slot]
                   (it never waits for the grid: the next stage's weights stream while the
                    compute warps wait for the other programs)
    compute warps: at a stage start: wait for the grid counter of the previous stage, stage the
                   stage's activations (RMS-normalised for q/k/v and gate/up) in shared memory;
                   per chunk: wait ready[slot], read the chunk, free the slot, multiply-add;
                   at a row tile's end: reduce across threads, store (residual add / SiLU x up);
                   at the stage's end: bump the stage's grid counter (release)

Registers of a chunk: thread (warp w, lane l) owns the 8 contiguous K columns w * BOX + 8 l .. + 7
of all BN rows, so each activation is read once per chunk and the K reduction stays in the thread
(acc [NB, BN, 32]); the cross-thread reduction happens once per row tile.

Activations between stages (h residual, q, SiLU x up) are fp32 in global memory, read through L2
(`.cg`) after an acquire on the counter. M (rows of the batch) is 1 or 2, a constexpr.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.decode_step_layout import stage_layout as _stage_layout
from ascend_kernels.decode_step_layout import tile_out as _tile_out
from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import smem_view as _view
from ascend_kernels.gluon_compat import tma_load as _tma_load


@gluon.jit
def _decode(r, offB, offC, offD, CQ: gl.constexpr, CO: gl.constexpr, CG: gl.constexpr, CD: gl.constexpr):
    """Chunk r of a program's layer -> (stage 0..3, its row tile j, chunk c inside the tile)."""
    s = (r >= offB).to(gl.int32) + (r >= offC).to(gl.int32) + (r >= offD).to(gl.int32)
    start = gl.where(s == 0, 0, gl.where(s == 1, offB, gl.where(s == 2, offC, offD)))
    per = gl.where(s == 0, CQ, gl.where(s == 1, CO, gl.where(s == 2, 2 * CG, CD)))
    return s, (r - start) // per, (r - start) % per


@gluon.jit
def _issue(i, P, offB, offC, offD, G, wq_desc, wo_desc, wg_desc, wd_desc, ring, ready,
           NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, BN: gl.constexpr, BOX: gl.constexpr,
           NB: gl.constexpr, NBUF: gl.constexpr, CQ: gl.constexpr, CO: gl.constexpr, CG: gl.constexpr,
           CD: gl.constexpr):
    """TMA copies of chunk i of this program's stream into its ring slot."""
    layer = i // P
    s, j, c = _decode(i - layer * P, offB, offC, offD, CQ, CO, CG, CD)
    row = (gl.program_id(0) + j * G) * BN
    slot = i % NBUF
    bar = ready.index(slot)
    mbarrier.expect(bar, BN * BOX * NB * 2)
    if s == 0:
        for b in gl.static_range(NB):
            _tma_load(wq_desc, [layer * NQ + row, (c * NB + b) * BOX], bar, ring.index(slot * NB + b))
    elif s == 1:
        for b in gl.static_range(NB):
            _tma_load(wo_desc, [layer * H + row, (c * NB + b) * BOX], bar, ring.index(slot * NB + b))
    elif s == 2:  # a gate/up tile: CG chunks of gate rows, then CG chunks of the matching up rows
        grow = layer * 2 * I + (c // CG) * I + row
        for b in gl.static_range(NB):
            _tma_load(wg_desc, [grow, ((c % CG) * NB + b) * BOX], bar, ring.index(slot * NB + b))
    else:
        for b in gl.static_range(NB):
            _tma_load(wd_desc, [layer * H + row, (c * NB + b) * BOX], bar, ring.index(slot * NB + b))


@gluon.jit
def _stage(xs, src_ptr, stride_m, nw, eps, M: gl.constexpr, K: gl.constexpr, XS_ROWS: gl.constexpr,
           NORM: gl.constexpr, NB: gl.constexpr):
    """The stage's activations (RMS-normalised with weights nw when NORM) into xs, once per stage."""
    kk = _stage_layout(K, NB)
    for m in gl.static_range(M):
        x = gl.load(src_ptr + m * stride_m + kk, cache_modifier=".cg")
        if NORM:
            x = x * gl.rsqrt(gl.sum(gl.sum(x * x, axis=1), axis=0) / K + eps) * nw
        xs.slice(m * XS_ROWS, K // 8, dim=0).store(x)


@gluon.jit
def _finish_tile(acc, rows, s, out_ptr, h_ptr, gate):
    """Store a finished row tile: q (stage 0), residual add (1, 3), gate kept / SiLU x up (2)."""
    val = _tile_out(acc)
    if s == 0:
        gl.store(out_ptr + rows, val)
    elif s == 2:
        gl.store(out_ptr + rows, gate / (1.0 + gl.exp(-gate)) * val)
    else:
        gl.store(h_ptr + rows, gl.load(h_ptr + rows, cache_modifier=".cg") + val)


@gluon.jit
def stage_offsets(G, NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, BN: gl.constexpr, CG: gl.constexpr,
                  CD: gl.constexpr):
    """This program's first chunk of the o, gate/up and down stages inside a layer's chunks, and the
    layer's chunk count (CG chunks per row tile of K = H, 2 CG for a gate/up tile, CD for down)."""
    pid = gl.program_id(0)
    offB = (NQ // BN - pid + G - 1) // G * CG
    offC = offB + (H // BN - pid + G - 1) // G * CG
    offD = offC + (I // BN - pid + G - 1) // G * 2 * CG
    return offB, offC, offD, offD + (H // BN - pid + G - 1) // G * CD


@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, ring, xs,
            ready, empty, M: gl.constexpr, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr,
            BN: gl.constexpr, BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr, SYNC: gl.constexpr):
    KC: gl.constexpr = BOX * NB
    offB, offC, offD, P = stage_offsets(G, NQ, H, I, BN, H // KC, I // KC)
    for i in range(NL * P):
        mbarrier.wait(empty.index(i % NBUF), ((i // NBUF) & 1) ^ 1)
        _issue(i, P, offB, offC, offD, G, wq_desc, wo_desc, wg_desc, wd_desc, ring, ready,
               NQ, H, I, BN, BOX, NB, NBUF, H // KC, H // KC, H // KC, I // KC)


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, ring, xs,
             ready, empty, M: gl.constexpr, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr,
             BN: gl.constexpr, BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr, SYNC: gl.constexpr):
    KC: gl.constexpr = BOX * NB
    CG: gl.constexpr = H // KC
    CD: gl.constexpr = I // KC
    XS_ROWS: gl.constexpr = I // 8  # xs rows per batch row
    L4: gl.constexpr = gl.BlockedLayout([1, BN, 1, 8], [1, 1, 32, 1], [NB, 1, 1, 1], [3, 2, 1, 0])
    ACC: gl.constexpr = gl.SliceLayout(3, L4)
    XL: gl.constexpr = gl.SliceLayout(1, L4)
    ROWS: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, ACC))
    offB, offC, offD, P = stage_offsets(G, NQ, H, I, BN, CG, CD)
    ringv = _view(ring, gl.bfloat16, [NBUF, NB, BN, BOX // 8, 8], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    xsv = _view(xs, gl.float32, [M * CD, NB, BOX // 8, 8], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    rows_in = gl.arange(0, BN, layout=ROWS)
    acc0 = gl.zeros([NB, BN, BOX // 8], gl.float32, ACC)
    acc1 = gl.zeros([NB, BN, BOX // 8], gl.float32, ACC)
    gate0 = gl.zeros([BN], gl.float32, ROWS)
    gate1 = gl.zeros([BN], gl.float32, ROWS)
    for i in range(NL * P):
        layer = i // P
        r = i - layer * P
        s, j, c = _decode(r, offB, offC, offD, CG, CG, CG, CD)
        if (r == 0) | (r == offB) | (r == offC) | (r == offD):  # a stage starts
            # the norm weights do not depend on the grid: load them before the wait (masked off elsewhere)
            kk = _stage_layout(H, NB)
            nw = gl.load(gl.where(s == 0, n1_ptr, n2_ptr) + layer * H + kk, mask=(kk < H) & (s % 2 == 0),
                         other=0.0).to(gl.float32)
            if SYNC:  # noqa: SIM102 (a constexpr test must stay apart from a run-time one)
                if layer * 4 + s > 0:  # the previous stage's outputs are all stored
                    while gl.atomic_add(cnt_ptr + layer * 4 + s - 1, 0, sem="acquire") < G:
                        pass
            _barrier()  # the previous stage's last chunk has read xs
            if s == 0:
                _stage(xs, h_ptr, H, nw, eps, M, H, XS_ROWS, True, NB)
            elif s == 1:
                _stage(xs, q_ptr, NQ, nw, eps, M, H, XS_ROWS, False, NB)
            elif s == 2:
                _stage(xs, h_ptr, H, nw, eps, M, H, XS_ROWS, True, NB)
            else:
                _stage(xs, g_ptr, I, nw, eps, M, I, XS_ROWS, False, NB)
            _barrier()
        slot = i % NBUF
        mbarrier.wait(ready.index(slot), (i // NBUF) & 1)
        w = ringv.index(slot).load(L4).to(gl.float32)
        _barrier()  # every warp holds its part of the chunk
        mbarrier.arrive(empty.index(slot), count=1)
        cx = gl.where(s == 2, c % CG, c)
        acc0 += gl.sum(w * gl.expand_dims(xsv.index(cx).load(XL), 1), axis=3)
        if M == 2:
            acc1 += gl.sum(w * gl.expand_dims(xsv.index(CD + cx).load(XL), 1), axis=3)
        rows = (gl.program_id(0) + j * G) * BN + rows_in
        out_ptr = gl.where(s == 0, q_ptr, g_ptr)
        out_stride = gl.where(s == 0, NQ, I)
        if (s == 2) & (c == CG - 1):  # the gate half of a gate/up tile
            gate0 = _tile_out(acc0)
            acc0 = gl.zeros([NB, BN, BOX // 8], gl.float32, ACC)
            if M == 2:
                gate1 = _tile_out(acc1)
                acc1 = gl.zeros([NB, BN, BOX // 8], gl.float32, ACC)
        elif c == gl.where(s == 0, CG, gl.where(s == 1, CG, gl.where(s == 2, 2 * CG, CD))) - 1:
            _finish_tile(acc0, rows, s, out_ptr, h_ptr, gate0)
            acc0 = gl.zeros([NB, BN, BOX // 8], gl.float32, ACC)
            if M == 2:
                _finish_tile(acc1, rows, s, out_ptr + out_stride, h_ptr + H, gate1)
                acc1 = gl.zeros([NB, BN, BOX // 8], gl.float32, ACC)
        if SYNC:  # noqa: SIM102
            if (r == offB - 1) | (r == offC - 1) | (r == offD - 1) | (r == P - 1):
                _barrier()  # this program's part of the stage is stored: tell the grid
                gl.atomic_add(cnt_ptr + layer * 4 + s, 1, sem="release")


@gluon.jit
def decode_megakernel_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc,  # TMA over [NL * N, K] bf16 (q/k/v, o, gate;up, down), box [BN, BOX]
    h_ptr,  # [M, H] fp32 residual stream (in / out)
    q_ptr,  # [M, NQ] fp32 scratch: q/k/v
    g_ptr,  # [M, I] fp32 scratch: SiLU(gate) x up
    n1_ptr, n2_ptr,  # [NL, H] bf16 norm weights
    cnt_ptr,  # [NL * 4] int32 grid counters, zero at launch
    eps, G,
    M: gl.constexpr, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, BN: gl.constexpr,
    BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr, SYNC: gl.constexpr,
):
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF * NB, BN, BOX], gl.NVMMASharedLayout(0, 16, rank=2))
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    xs = gl.allocate_shared_memory(gl.float32, [M * I // 8, 8], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    for b in gl.static_range(NBUF):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    # the argument tuples are spelled out: a tuple held in a variable loses its constexprs
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, ring,
                    xs, ready, empty, M, NL, H, I, NQ, BN, BOX, NB, NBUF, SYNC)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, ring,
                   xs, ready, empty, M, NL, H, I, NQ, BN, BOX, NB, NBUF, SYNC)),
    ], [1], [48])
    for b in gl.static_range(NBUF):
        mbarrier.invalidate(ready.index(b))
        mbarrier.invalidate(empty.index(b))
