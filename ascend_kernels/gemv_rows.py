"""SmoothGEMM's row-owner GEMV: the primitive for one or two tokens (decode at batch 1 or 2).

Each program owns BLOCK_N whole weight rows (a few KB) and the step's BLOCK_M token rows:

    weight [N, K]           program p: rows p*BLOCK_N .. +BLOCK_N, K in BLOCK_K pieces
    +--------------------+
    | p0 ===============>|  one contiguous load per piece, straight into registers
    | p1 ===============>|  out[m, n] = sum_k x[m, k] * w[n, k]   (fp32 FMAs, one reduction)
    | ...                |
    +--------------------+

Why not tl.dot: at M <= 2 the tensor-core tiles are 8-16x padding, and their operands go through
shared memory; a weight matrix of a few MB then cannot be spread over enough programs to keep HBM
busy. Small programs with plain loads reach what a kernel that only reads the weight reaches
(`python -m benchmarks.gemm_bound`, H100: Llama-3.2-1B o_proj 4.9 us against the pure read's
4.8 and cuBLAS's 6.4). This form reduces every piece across threads once per token, so past two
tokens the tl.dot primitives win; for three or four tokens (BLOCK_M 4) NVIDIA GPUs run
gemv_rows_fma.py, which reduces once per program, and this kernel serves that config elsewhere.

Virtual padding as in gemm.py: M is never a constexpr, rows past the real M (or past num_tokens,
read from the device) are neither read nor written, and a program of padded rows exits at once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ascend_kernels.gemm_loops import cdiv, real_rows
from ascend_kernels.gemm_table import ROWS_BLOCK_MS, GemmConfig
from ascend_kernels.launch_cache import LaunchCache


@triton.jit(do_not_specialize=["num_rows"])
def gemv_rows_kernel(
    x_ptr,  # [num_rows, K] activations, any strides
    w_ptr,  # [N, K] (Linear) or [K, N] (Conv1D), read through stride_wk / stride_wn
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [num_rows, N] x's dtype, rows of stride stride_om
    num_tokens_ptr,  # [1] int32 real M (read only when M_FROM_DEVICE)
    num_rows,  # rows the grid was sized for (the bucket, or the real M)
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    M_FROM_DEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # token rows per program (1, 2 or 4)
    BLOCK_N: tl.constexpr,  # weight rows per program
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
):
    M = real_rows(num_tokens_ptr, num_rows, M_FROM_DEVICE)
    first_row = tl.program_id(1) * BLOCK_M
    if first_row >= M:  # a tile of padded rows: the grid covers the bucket, the work the real M
        return
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = first_row + tl.arange(0, BLOCK_M)
    col_ok = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        w_ptrs = w_rows + (k0 + offs_k)[None, :] * stride_wk
        if EVEN_K:
            w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0).to(tl.float32)
        else:
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        for i in tl.static_range(BLOCK_M):
            row = first_row + i
            x_ok = k_ok & ((offs_k * 0 + row) < M)  # a vector mask (the interpreter wants one)
            xi = tl.load(x_ptr + row.to(tl.int64) * stride_xm + (k0 + offs_k) * stride_xk, mask=x_ok, other=0.0)
            part = tl.sum(w * xi.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
            acc = tl.where((tl.arange(0, BLOCK_M) == i)[:, None], acc + part[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_ok[None, :])


_LAUNCH = LaunchCache(gemv_rows_kernel)  # eager calls skip Triton's per-call binding (launch_cache.py)


def gemv_rows(
    x2d: torch.Tensor,  # [rows, K]
    weight: torch.Tensor,  # [N, K] or [K, N]
    bias: Optional[torch.Tensor],  # [N]
    out2d: torch.Tensor,  # [rows, N], unit column stride
    num_tokens: Optional[torch.Tensor],  # int32 [1] or None
    weight_kn: bool,
    cfg: GemmConfig,
) -> None:
    """Grid (weight-row tiles, row tiles of the bucket); the kernel stops at the real M."""
    if not cfg.rows:
        raise ValueError(f"gemv_rows: {cfg} is not a row-owner config (block_m must be one of {ROWS_BLOCK_MS})")
    if out2d.stride(1) != 1:
        raise ValueError("gemv_rows: out rows must be contiguous")
    rows, k = x2d.shape
    n = out2d.shape[1]
    stride_wk, stride_wn = weight.stride() if weight_kn else weight.stride()[::-1]
    grid = (cdiv(n, cfg.block_n), cdiv(rows, cfg.block_m))
    if grid[1] > 65535:  # CUDA's limit on grid axis 1; this primitive is meant for one or two rows
        raise ValueError(f"gemv_rows: {rows} rows in tiles of {cfg.block_m} exceed the grid; use a tl.dot primitive")
    _LAUNCH(grid,
        x2d, weight, bias if bias is not None else out2d, out2d,
        num_tokens if num_tokens is not None else out2d,
        rows, n, k,
        x2d.stride(0), x2d.stride(1), stride_wk, stride_wn, out2d.stride(0),
        HAS_BIAS=bias is not None, M_FROM_DEVICE=num_tokens is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
