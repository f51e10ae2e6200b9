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

from ascend_kernels.decode_rows_stream import BOXK, Q
from ascend_kernels.decode_rows_stream import down_rows as _down_rows
from ascend_kernels.decode_rows_stream import gate_up_rows as _gate_up_rows
from ascend_kernels.decode_rows_stream import gemv_rows as _gemv_rows
from ascend_kernels.decode_rows_stream import issue_layer as _issue_layer
from ascend_kernels.decode_rows_stream import release_ring as _release_ring
from ascend_kernels.decode_rows_stream import rows_smem as _rows_smem
from ascend_kernels.decode_rows_stream import stage_rows as _stage
from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import smem_view as _view
from ascend_kernels.grid_sync import signal_stage, wait_stage


@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring, xs,
            dp, ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr,
            MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    i = 0
    for layer in range(NL):
        i = _issue_layer(wq_desc, wo_desc, wg_desc, wd_desc, layer, i, ring, ready, empty, G, NQ, H, I, BN, NB, NBUF)


@gluon.jit
def _stage_start(xs, src_ptr, stride_m, nw_ptr, eps, M, cnt_ptr, done, G, NORM: gl.constexpr, MB: gl.constexpr,
                 NB: gl.constexpr, H: gl.constexpr):
    """Wait for counter `done` (the previous stage; none before the first), then stage the rows'
    activations; returns their row scales [MB, 1] (ones without NORM)."""
    if done >= 0:
        wait_stage(cnt_ptr, done, G)
    _barrier()  # the previous stage's last chunk has read xs
    rs = gl.expand_dims(_stage(xs, src_ptr, stride_m, 0, nw_ptr, eps, M, NORM, H, MB, NB), 1)
    _barrier()
    return rs


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring, xs,
             dp, ready, empty, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr,
             MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NB, 1, 1], instr_shape=[1, 16, 8])
    OUT: gl.constexpr = gl.SliceLayout(0, MMA)
    ringv = _view(ring, gl.bfloat16, [NBUF * Q, NB, BN, BOXK], gl.NVMMASharedLayout(128, 16, rank=3))
    m2 = gl.expand_dims(gl.arange(0, MB, layout=gl.SliceLayout(1, OUT)), 1)  # [MB, 1]
    n2 = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, OUT)), 0)  # [1, BN]
    ok = (m2 < M) & (n2 >= 0)
    i = 0
    for layer in range(NL):
        c0 = layer * 4
        rs = _stage_start(xs, h_ptr, H, n1_ptr + layer * H, eps, M, cnt_ptr, c0 - 1, G, True, MB, NB, H)
        i = _gemv_rows(ringv, xs, ready, empty, i, NQ, q_ptr, rs, m2, n2, ok, G, False, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, c0)
        rs = _stage_start(xs, q_ptr, NQ, n1_ptr, eps, M, cnt_ptr, c0, G, False, MB, NB, H)  # ones
        i = _gemv_rows(ringv, xs, ready, empty, i, H, h_ptr, rs, m2, n2, ok, G, True, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, c0 + 1)
        rs = _stage_start(xs, h_ptr, H, n2_ptr + layer * H, eps, M, cnt_ptr, c0 + 1, G, True, MB, NB, H)
        i = _gate_up_rows(ringv, xs, ready, empty, i, g_ptr, rs, m2, n2, ok, G, I, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, c0 + 2)
        wait_stage(cnt_ptr, c0 + 2, G)
        i = _down_rows(ringv, xs, dp, ready, empty, i, g_ptr, h_ptr, eps, M, m2, n2, ok, G, H, I, MB, BN, NB, NBUF)
        signal_stage(cnt_ptr, c0 + 3)


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
    ring, xs, dp, ready, empty = _rows_smem(MB, BN, NB, NBUF, MAXT)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring,
                    xs, dp, ready, empty, NL, H, I, NQ, MB, BN, NB, NBUF)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, h_ptr, q_ptr, g_ptr, n1_ptr, n2_ptr, cnt_ptr, eps, G, M, ring,
                   xs, dp, ready, empty, NL, H, I, NQ, MB, BN, NB, NBUF)),
    ], [1], [48])
    _release_ring(ready, empty, NBUF)
