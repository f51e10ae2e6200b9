"""A batch-16 probe of the persistent decode kernel for issue 6 (H100 batch 16): the 16 Llama-3.2-1B
layers WITHOUT attention at up to MB = 16 rows in ONE launch, the GEMVs on tensor cores (`mma_v2`).

Not wired into the engine. `python -m benchmarks.bench_megakernel` times it against Inductor + cuBLAS
at M = 16. It answers whether the batch-1 kernel's weight stream (ascend_kernels/decode_step_kernel.py)
can carry 16 rows: on CUDA cores a 32 KB chunk would be 262K multiply-adds, above its HBM time.

The chunks, their shared-memory layout and the tensor-core product are ascend_kernels/decode_rows_stream.py's.

Stages per layer, each ended by a grid counter: q/k/v (norm 1), o (+ h; its input is q's first H
columns), gate/up (norm 2; SiLU(gate) x up to g), down (+ h). Down's K is the MLP width: its chunks
come slice by slice (2,048 columns of g staged at a time, every tile of this program per slice), with
the tiles' partial sums in shared memory.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.decode_rows_stream import BOXK, KC, Q
from ascend_kernels.decode_rows_stream import chunk_out as _chunk_out
from ascend_kernels.decode_rows_stream import issue_chunk as _issue
from ascend_kernels.decode_rows_stream import num_tiles as _num_tiles
from ascend_kernels.decode_rows_stream import stage_rows as _stage
from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import smem_view as _view
from ascend_kernels.grid_sync import signal_stage, wait_stage


@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring, xs,
            dp, ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr,
            MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    pid = gl.program_id(0)
    nq, no, ng = _num_tiles(NQ, BN, G), _num_tiles(H, BN, G), _num_tiles(I, BN, G)
    i = 0
    for layer in range(NL):
        for j in range(nq):
            _issue(wq_desc, layer * NQ + (pid + j * G) * BN, 0, i, ring, ready, empty, NB, BN, NBUF)
            i += 1
        for j in range(no):
            _issue(wo_desc, layer * H + (pid + j * G) * BN, 0, i, ring, ready, empty, NB, BN, NBUF)
            i += 1
        for j in range(ng):  # the gate rows, then the same rows of up
            _issue(wg_desc, layer * 2 * I + (pid + j * G) * BN, 0, i, ring, ready, empty, NB, BN, NBUF)
            _issue(wg_desc, layer * 2 * I + I + (pid + j * G) * BN, 0, i + 1, ring, ready, empty, NB, BN, NBUF)
            i += 2
        for c in range(I // KC):  # down: slice by slice of its K, every tile of this program per slice
            for j in range(no):
                _issue(wd_desc, layer * H + (pid + j * G) * BN, c * KC, i, ring, ready, empty, NB, BN, NBUF)
                i += 1


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring, xs,
             dp, ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr,
             MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NB, 1, 1], instr_shape=[1, 16, 8])
    OUT: gl.constexpr = gl.SliceLayout(0, MMA)
    ringv = _view(ring, gl.bfloat16, [NBUF * Q, NB, BN, BOXK], gl.NVMMASharedLayout(128, 16, rank=3))
    pid = gl.program_id(0)
    m2 = gl.expand_dims(gl.arange(0, MB, layout=gl.SliceLayout(1, OUT)), 1)  # [MB, 1]
    n2 = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, OUT)), 0)  # [1, BN]
    ok = (m2 < M) & (n2 >= 0)
    nq, no, ng = _num_tiles(NQ, BN, G), _num_tiles(H, BN, G), _num_tiles(I, BN, G)
    i = 0
    for layer in range(NL):
        for s in gl.static_range(4):
            if layer * 4 + s > 0:
                wait_stage(cnt_ptr, layer * 4 + s - 1, G)
            _barrier()  # the previous stage's last chunk has read xs
            if s == 0:
                rs = gl.expand_dims(_stage(xs, h_ptr, H, 0, n1_ptr + layer * H, eps, M, True, H, MB, NB), 1)
            elif s == 1:
                _stage(xs, q_ptr, NQ, 0, n1_ptr, eps, M, False, H, MB, NB)
            elif s == 2:
                rs = gl.expand_dims(_stage(xs, h_ptr, H, 0, n2_ptr + layer * H, eps, M, True, H, MB, NB), 1)
            else:
                _stage(xs, g_ptr, I, 0, n2_ptr, eps, M, False, KC, MB, NB)
            _barrier()
            if s == 0:
                for j in range(nq):
                    out = _chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF) * rs
                    gl.store(q_ptr + m2 * NQ + (pid + j * G) * BN + n2, out, mask=ok)
                    i += 1
            elif s == 1:
                for j in range(no):
                    out = _chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF)
                    dst = h_ptr + m2 * H + (pid + j * G) * BN + n2
                    gl.store(dst, gl.load(dst, mask=ok, other=0.0, cache_modifier=".cg") + out, mask=ok)
                    i += 1
            elif s == 2:
                for j in range(ng):
                    gate = _chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF) * rs
                    up = _chunk_out(ringv, xs, ready, empty, i + 1, MB, BN, NB, NBUF) * rs
                    gl.store(g_ptr + m2 * I + (pid + j * G) * BN + n2, gate / (1.0 + gl.exp(-gate)) * up, mask=ok)
                    i += 2
            else:
                for c in range(I // KC):
                    if c > 0:  # the next slice of g (every warp is done with this one)
                        _barrier()
                        _stage(xs, g_ptr, I, c * KC, n2_ptr, eps, M, False, KC, MB, NB)
                        _barrier()
                    for j in range(no):
                        out = _chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF)
                        part = dp.index(j)
                        if c > 0:
                            out += part.load(OUT)
                        if c == I // KC - 1:
                            dst = h_ptr + m2 * H + (pid + j * G) * BN + n2
                            gl.store(dst, gl.load(dst, mask=ok, other=0.0, cache_modifier=".cg") + out, mask=ok)
                        else:
                            part.store(out)
                        i += 1
            signal_stage(cnt_ptr, layer * 4 + s)


@gluon.jit
def decode_megakernel_mma_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc,  # TMA over [NL * N, K] bf16 (q;k;v, o, gate;up, down), box [BN, 64], 128B swizzle
    h_ptr,  # [MB, H] fp32 residual stream (rows < M: in / out)
    q_ptr,  # [MB, NQ] fp32 scratch: q/k/v
    g_ptr,  # [MB, I] fp32 scratch: SiLU(gate) x up
    n1_ptr, n2_ptr,  # [NL, H] bf16 norm weights
    cnt_ptr,  # [NL * 4] int32 grid counters, zero at launch
    eps, G, M,
    NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr, BN: gl.constexpr,
    NB: gl.constexpr, NBUF: gl.constexpr, MAXT: gl.constexpr,
):
    # one TMA box per index of `ring` (128-byte swizzle: the pattern repeats every 8 rows, i.e. per box);
    # the compute warps see the same bytes as [NBUF * Q, NB, BN, BOXK] (ringv)
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF * Q * NB, BN, BOXK], gl.NVMMASharedLayout(128, 16, rank=2))
    xs = gl.allocate_shared_memory(gl.bfloat16, [Q, NB, MB, BOXK], gl.NVMMASharedLayout(128, 16, rank=3))
    dp = gl.allocate_shared_memory(gl.float32, [MAXT, MB, BN], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(NBUF):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring,
                    xs, dp, ready, empty, NL, H, I, NQ, MB, BN, NB, NBUF)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring,
                   xs, dp, ready, empty, NL, H, I, NQ, MB, BN, NB, NBUF)),
    ], [1], [48])
    for b in gl.static_range(NBUF):
        mbarrier.invalidate(ready.index(b))
        mbarrier.invalidate(empty.index(b))
