"""SmoothGEMM's row-owner GEMV for three or four tokens on NVIDIA GPUs (Gluon): rows4.

The row-owner GEMV (gemv_rows.py) reads whole weight rows in long contiguous pieces, which is what
lets one or two tokens run at the speed of a bare read of the weight. Its Triton form reduces every
piece across the program's threads once per token, so at three tokens it lost to the tl.dot GEMV.
Here each thread keeps its own partial sums over the K columns it owns and the program reduces once,
at the end; a piece of x is converted once and reused for all of the program's weight rows::

    thread t of a program, K piece p (VEC = 8 columns per thread, 32 x warps threads):
        w[n, p*BK + t*8 .. +8]  (16-byte load per weight row n)
        x[m, p*BK + t*8 .. +8]  (16-byte load per token m < 4)
        acc[m, n, t] += sum_v x[m, v] * w[n, v]      (fp32 FMAs, no communication)
    end: out[m, n] = sum_t acc[m, n, t]              (one cross-thread reduction)

Measured on an H100 (benchmarks/RESULTS.md, twenty-fifth session): at M = 3, 1.14x cuBLAS on the
Llama-3.2-1B o and down projections and the Llama-3-8B o projection; at M = 8 the FMAs bound it
(0.71-0.90x), so the tuner offers it for the (2, 4] token range only. Virtual padding as in gemm.py:
rows past the real M (or `num_tokens`, read on the device) are neither read nor written. Linear
weights ([N, K], unit inner stride), 16-bit, K a multiple of block_k = 256 x warps, N of block_n;
elsewhere the same config runs the Triton row-owner kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.gemm_loops import aligned_rows, cuda_capability
from ascend_kernels.gemm_table import GemmConfig

VEC = gl.constexpr(8)  # 16-bit columns per thread and piece: one 16-byte load


@gluon.jit
def _ids3(n: gl.constexpr, axis: gl.constexpr, layout: gl.constexpr):
    """arange(n) along `axis` of a rank-3 layout, expanded to rank 3."""
    if axis == 0:
        ids = gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
        return gl.expand_dims(gl.expand_dims(ids, 1), 2)
    elif axis == 1:
        ids = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
        return gl.expand_dims(gl.expand_dims(ids, 0), 2)
    else:
        ids = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
        return gl.expand_dims(gl.expand_dims(ids, 0), 1)


@gluon.jit
def gemv_rows_fma_kernel(
    x_ptr,  # [num_rows, K] 16-bit activations, unit inner stride
    w_ptr,  # [N, K] Linear weight, unit inner stride
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [num_rows, N] x's dtype
    num_tokens_ptr,  # [1] int32 real M (read only when M_FROM_DEVICE)
    num_rows, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: gl.constexpr, M_FROM_DEVICE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    WARPS: gl.constexpr,
):
    M = num_rows
    if M_FROM_DEVICE:
        M = gl.minimum(gl.load(num_tokens_ptr), num_rows)
    m0 = gl.program_id(1) * BLOCK_M
    if m0 >= M:  # a tile of padded rows: the grid covers the bucket, the work the real M
        return
    T: gl.constexpr = 32 * WARPS
    L4: gl.constexpr = gl.BlockedLayout([BLOCK_M, BLOCK_N, 1, VEC], [1, 1, 32, 1], [1, 1, WARPS, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(0, L4)  # [BLOCK_N, T, VEC]
    LX: gl.constexpr = gl.SliceLayout(1, L4)  # [BLOCK_M, T, VEC]
    n0 = gl.program_id(0) * BLOCK_N
    cols_w = _ids3(T, 1, LW) * VEC + _ids3(VEC, 2, LW)
    w_ptrs = w_ptr + (n0 + _ids3(BLOCK_N, 0, LW)).to(gl.int64) * stride_wn + cols_w
    rows_x = m0 + _ids3(BLOCK_M, 0, LX)
    cols_x = _ids3(T, 1, LX) * VEC + _ids3(VEC, 2, LX)
    x_ptrs = x_ptr + rows_x.to(gl.int64) * stride_xm + cols_x
    x_ok = (rows_x < M) & (cols_x >= 0)
    acc = gl.zeros([BLOCK_M, BLOCK_N, T], gl.float32, gl.SliceLayout(3, L4))
    for k in range(0, K, T * VEC):
        w = gl.load(w_ptrs + k).to(gl.float32)
        x = gl.load(x_ptrs + k, mask=x_ok, other=0.0).to(gl.float32)
        acc += gl.sum(gl.expand_dims(x, 1) * gl.expand_dims(w, 0), axis=3)  # within each thread
    res = gl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]: the one cross-thread reduction
    LO: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))
    m = m0 + gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LO)), 1)
    n = n0 + gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, LO)), 0)
    if HAS_BIAS:
        res += gl.load(bias_ptr + n).to(gl.float32)
    gl.store(out_ptr + m.to(gl.int64) * stride_om + n, res.to(out_ptr.dtype.element_ty), mask=(m < M) & (n >= 0))


def rows_fma_ok(x2d: torch.Tensor, weight: torch.Tensor, out2d: torch.Tensor, weight_kn: bool,
                cfg: GemmConfig) -> bool:
    """Whether this kernel serves `cfg` (a rows4 config) here; the Triton row-owner kernel otherwise."""
    k = x2d.shape[1]
    if not x2d.is_cuda or torch.version.hip is not None or cuda_capability(x2d.device.index) < 8:
        return False  # the layouts assume 32-thread warps; Gluon targets Ampere and newer
    return (cfg.block_m == 4 and not weight_kn and x2d.dtype != torch.float32
            and cfg.block_k == 256 * cfg.num_warps and k % cfg.block_k == 0
            and out2d.shape[1] % cfg.block_n == 0 and aligned_rows(x2d, weight))


def gemv_rows_fma(
    x2d: torch.Tensor,  # [rows, K]
    weight: torch.Tensor,  # [N, K]
    bias: Optional[torch.Tensor],  # [N]
    out2d: torch.Tensor,  # [rows, N], unit column stride
    num_tokens: Optional[torch.Tensor],  # int32 [1] or None
    cfg: GemmConfig,
) -> None:
    """Grid (weight-row tiles, 4-row tiles of the bucket); see rows_fma_ok for when it applies."""
    rows, k = x2d.shape
    n = out2d.shape[1]
    m_dev = num_tokens is not None
    gemv_rows_fma_kernel[(n // cfg.block_n, -(-rows // cfg.block_m))](
        x2d, weight, bias if bias is not None else out2d, out2d, num_tokens if m_dev else out2d,
        rows, k, x2d.stride(0), weight.stride(0), out2d.stride(0),
        HAS_BIAS=bias is not None, M_FROM_DEVICE=m_dev, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        WARPS=cfg.num_warps, num_warps=cfg.num_warps,
    )  # fmt: skip
