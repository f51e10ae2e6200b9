"""SmoothGEMM swap-AB tiles on Hopper (Gluon): out^T = W @ x^T with the weight on wgmma's M side.

A few tokens (M <= 128) against a large weight is a weight stream: every weight byte is read
once and multiplied by at most 128 token rows. The tiled tl.dot primitive puts the tokens on the
MMA's M side, where Hopper's wgmma needs 64 rows (Triton falls back to the older mma below that),
and Triton's generated pipeline did not keep HBM busy here (0.90x cuBLAS at M = 17-64 on an H100,
benchmarks/RESULTS.md, twenty-fifth session). This kernel is the weight stream of the swap-AB
decode kernels (rows_wgmma_stream.py) as a standalone GEMM: a program owns BLOCK_N = 16 x warps
weight rows and BLOCK_M tokens over one K slice, and keeps NBUF chunks of TMA loads in flight::

    chunk c (ring slot c % NBUF):  W[n0 .. n0 + BLOCK_N, k .. k + 64 CB]   as CB boxes [BLOCK_N, 64]
                                   x[m0 .. m0 + BLOCK_M, k .. k + 64 CB]   as CB boxes [BLOCK_M, 64]
    acc[BLOCK_N, BLOCK_M] += W_box @ x_box^T      (wgmma m64 n BLOCK_M k16, async)

Virtual padding: both descriptors are built on the device over the real [M, K] rows (M read from
`num_tokens` when given), so rows past M are never fetched (the copy engine writes zeros on chip)
and never stored. Split-K programs publish fp32 partials; the tile's last slice to arrive sums
them in slice order (the same bits every launch) and stores the tile, as the tiled primitive does.

Linear weights ([N, K], unit inner stride) only, 16-bit, N a multiple of BLOCK_N; elsewhere the
same config runs the tiled primitive's portable tl.dot form (gemm_loops.mma with SWAP_AB).
"""
from __future__ import annotations

from typing import Optional

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from ascend_kernels.arrival_counters import arrival_counters
from ascend_kernels.gemm_loops import cdiv, cuda_capability, tma_ok
from ascend_kernels.gemm_table import GemmConfig
from ascend_kernels.gluon_compat import cta_barrier, tma_load

BOX_K = gl.constexpr(64)  # columns per TMA box: 128 bytes of a 16-bit row (128-byte swizzle)


@gluon.jit
def _issue(w_desc, x_desc, n0, m0, k, slot, ring_w, ring_x, ready, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
           CB: gl.constexpr):
    """TMA loads of one chunk (CB boxes of W rows and of x rows from column k) into ring slot `slot`."""
    bar = ready.index(slot)
    mbarrier.expect(bar, CB * (BLOCK_N + BLOCK_M) * BOX_K * 2)  # out-of-range rows still land (as zeros)
    for b in gl.static_range(CB):
        tma_load(w_desc, [n0, k + b * BOX_K], bar, ring_w.index(slot * CB + b))
        tma_load(x_desc, [m0, k + b * BOX_K], bar, ring_x.index(slot * CB + b))


@gluon.jit
def _stream(w_desc, x_desc, n0, m0, c0, c1, acc, ring_w, ring_x, ready, BLOCK_N: gl.constexpr,
            BLOCK_M: gl.constexpr, CB: gl.constexpr, NBUF: gl.constexpr):
    """acc += the chunks c0 .. c1 - 1 of this tile; NBUF - 1 chunks stay in flight behind the MMAs."""
    CHUNK: gl.constexpr = CB * BOX_K
    for j in gl.static_range(NBUF - 1):  # prologue
        if c0 + j < c1:
            _issue(w_desc, x_desc, n0, m0, (c0 + j) * CHUNK, j, ring_w, ring_x, ready, BLOCK_N, BLOCK_M, CB)
    for i in range(c1 - c0):
        slot = i % NBUF
        mbarrier.wait(ready.index(slot), (i // NBUF) & 1)
        for b in gl.static_range(CB):
            acc = warpgroup_mma(ring_w.index(slot * CB + b), ring_x.index(slot * CB + b).permute((1, 0)), acc,
                                is_async=True)
        # this chunk's wgmmas may run on; the previous chunk's are done, so its slot can be refilled
        acc = warpgroup_mma_wait(CB, deps=(acc, ))
        nxt = i + NBUF - 1
        if c0 + nxt < c1:
            _issue(w_desc, x_desc, n0, m0, (c0 + nxt) * CHUNK, nxt % NBUF, ring_w, ring_x, ready, BLOCK_N, BLOCK_M,
                   CB)
    return warpgroup_mma_wait(0, deps=(acc, ))


@gluon.jit
def _store(acc, out_ptr, bias_ptr, n0, m0, M, N, stride_om, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr,
           BLOCK_M: gl.constexpr, NUM_WARPS: gl.constexpr):
    """out[m0 + j, n0 + r] = acc[r, j] (+ bias) for the real rows, weight rows contiguous per thread."""
    OUT: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, NUM_WARPS], [0, 1])
    val = gl.convert_layout(acc, OUT)
    r = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT)), 1)
    j = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, OUT)), 0)
    if HAS_BIAS:
        val += gl.load(bias_ptr + n0 + r).to(gl.float32)
    ok = (m0 + j < M) & (n0 + r < N)
    gl.store(out_ptr + (m0 + j).to(gl.int64) * stride_om + n0 + r, val.to(out_ptr.dtype.element_ty), mask=ok)


@gluon.jit
def swap_gemm_hopper_kernel(
    x_ptr,  # [num_rows, K] 16-bit activations, unit inner stride
    w_ptr,  # [N, K] Linear weight, unit inner stride
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [num_rows, N] x's dtype
    partials_ptr,  # [tiles, SPLIT_K, BLOCK_N, BLOCK_M] fp32 split-K partials (SPLIT_K > 1)
    counters_ptr,  # [>= tiles] int32 arrivals per tile, zero between launches (SPLIT_K > 1)
    num_tokens_ptr,  # [1] int32 real M (read only when M_FROM_DEVICE)
    num_rows, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: gl.constexpr, M_FROM_DEVICE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    CB: gl.constexpr, NBUF: gl.constexpr, SPLIT_K: gl.constexpr, NUM_WARPS: gl.constexpr,
):
    M = num_rows
    if M_FROM_DEVICE:
        M = gl.minimum(gl.load(num_tokens_ptr), num_rows)
    tiles_m = gl.cdiv(num_rows, BLOCK_M)  # the grid's row tiles (the bucket); the work stops at the real M
    pid = gl.program_id(0)
    pid_m = pid % tiles_m  # a weight tile's token tiles are neighbours: its second read comes from L2
    n0 = (pid // tiles_m) * BLOCK_N
    m0 = pid_m * BLOCK_M
    if m0 >= M:
        return
    smem: gl.constexpr = gl.NVMMASharedLayout(128, 16, rank=2)
    w_desc = tma.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BOX_K], smem)
    x_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BOX_K], smem)
    ring_w = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [NBUF * CB, BLOCK_N, BOX_K], smem)
    ring_x = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [NBUF * CB, BLOCK_M, BOX_K], smem)
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NBUF):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    chunks = gl.cdiv(K, CB * BOX_K)
    per = gl.cdiv(chunks, SPLIT_K)
    c0 = gl.program_id(1) * per
    acc = _stream(w_desc, x_desc, n0, m0, c0, gl.minimum(chunks, c0 + per),
                  gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC), ring_w, ring_x, ready, BLOCK_N, BLOCK_M, CB, NBUF)
    for s in gl.static_range(NBUF):
        mbarrier.invalidate(ready.index(s))
    if SPLIT_K > 1:
        r = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC)), 1)
        j = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC)), 0)
        offs = r * BLOCK_M + j
        base = pid.to(gl.int64) * SPLIT_K * (BLOCK_N * BLOCK_M)
        gl.store(partials_ptr + base + gl.program_id(1) * (BLOCK_N * BLOCK_M) + offs, acc)
        cta_barrier()  # every thread's partial precedes the release below
        if gl.atomic_add(counters_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = gl.load(partials_ptr + base + offs, cache_modifier=".cg")
            for s in gl.static_range(1, SPLIT_K):
                acc += gl.load(partials_ptr + base + s * (BLOCK_N * BLOCK_M) + offs, cache_modifier=".cg")
            gl.atomic_xchg(counters_ptr + pid, 0)  # zero for the next launch
            _store(acc, out_ptr, bias_ptr, n0, m0, M, N, stride_om, HAS_BIAS, BLOCK_N, BLOCK_M, NUM_WARPS)
    else:
        _store(acc, out_ptr, bias_ptr, n0, m0, M, N, stride_om, HAS_BIAS, BLOCK_N, BLOCK_M, NUM_WARPS)


def smem_bytes(cfg: GemmConfig) -> int:
    """Shared memory of the ring (the barriers and the store's layout change come on top)."""
    return cfg.num_stages * cfg.block_k * (cfg.block_n + cfg.block_m) * 2


def swap_hopper_ok(x2d: torch.Tensor, weight: torch.Tensor, out2d: torch.Tensor, weight_kn: bool,
                   cfg: GemmConfig) -> bool:
    """Whether `cfg` (swap_ab + tma) runs this Gluon kernel here; the tl.dot form runs otherwise."""
    if not (x2d.is_cuda and cfg.swap_ab and cfg.tma) or weight_kn or x2d.dtype == torch.float32 or torch.version.hip:
        return False
    n = out2d.shape[1]
    return (cuda_capability(x2d.device.index) == 9 and cfg.block_n == 16 * cfg.num_warps and cfg.num_warps in (4, 8)
            and cfg.block_k % 64 == 0 and n % cfg.block_n == 0 and smem_bytes(cfg) <= 200 * 1024
            and tma_ok(x2d, weight))  # unit inner strides, 16-byte rows; sets the descriptors' allocator


def swap_gemm_hopper(
    x2d: torch.Tensor,  # [rows, K]
    weight: torch.Tensor,  # [N, K]
    bias: Optional[torch.Tensor],  # [N]
    out2d: torch.Tensor,  # [rows, N] contiguous
    num_tokens: Optional[torch.Tensor],  # int32 [1] or None
    cfg: GemmConfig,
) -> None:
    """Grid: (weight tiles x the bucket's token tiles, split_k); see swap_hopper_ok for when it applies."""
    rows, k = x2d.shape
    n = out2d.shape[1]
    tiles = cdiv(rows, cfg.block_m) * (n // cfg.block_n)
    partials = counters = out2d  # not read without split-K
    if cfg.split_k > 1:
        partials = torch.empty(tiles * cfg.split_k * cfg.block_m * cfg.block_n, dtype=torch.float32,
                               device=x2d.device)
        counters = arrival_counters(x2d.device, tiles)
    m_dev = num_tokens is not None
    swap_gemm_hopper_kernel[(tiles, cfg.split_k)](
        x2d, weight, bias if bias is not None else out2d, out2d, partials, counters,
        num_tokens if m_dev else out2d, rows, n, k, x2d.stride(0), weight.stride(0), out2d.stride(0),
        HAS_BIAS=bias is not None, M_FROM_DEVICE=m_dev, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CB=cfg.block_k // 64, NBUF=cfg.num_stages, SPLIT_K=cfg.split_k, NUM_WARPS=cfg.num_warps,
        num_warps=cfg.num_warps,
    )  # fmt: skip
