"""SmoothGEMM persistent tiles: a fixed grid of one program per core, walking whole output tiles.

For large M (prefill chunks, big verify batches) the tiled primitive launches one program per
tile, and every program builds its pipeline, fills it and drains it once. Here the grid is the
number of cores times `persistent`, whatever M is; program p takes tiles p, p + P, p + 2P, ... in
grouped order, the full K each, so the pipeline of one tile's loads overlaps the previous tile's
epilogue, and the output goes out as a bulk copy (TMA store)::

    tiles (grouped order)   0   1   2   3   4   5   6   7   8 ...
    program                 0   1   2   0   1   2   0   1   2 ...   (P = 3)

Virtual padding holds as in the other primitives: every descriptor spans the real [M, K] / [M, N]
rows (read from the `num_tokens` device tensor or given as an int), so rows past M are neither
fetched (the copy engine fills them with zeros on chip) nor stored. A new M compiles nothing, and
with `num_tokens` one CUDA graph serves every M of a bucket (the grid depends on the bucket only).

`warp_spec` asks Triton to split each program into a loader and MMA consumers (automatic warp
specialisation on Hopper); it applies to 16-bit inputs, and the compiler ignores it elsewhere.
Descriptors need a Hopper-class GPU (or the CPU interpreter) and 16-byte aligned rows; otherwise
`smooth_gemm` runs the same tiles through the tiled primitive's masked loads (gemm_loops.tma_ok
checks x, the weight and the output).

Measured on an H100 (benchmarks/RESULTS.md, twenty-third session): with 128 x 256 tiles 0.99x
cuBLAS (geomean) at M >= 1000 on the Llama shapes, where the tiled primitive ran at 0.89x; slow
below M ~ 500 (K is never split: too few tiles for the cores), so the tuner offers it for the large
ranges only. The tuned tables still prefer cuBLAS there: at the bottom of a range (M = 1025, ...) an
almost empty row of tiles pushes the tile count past a wave of the cores.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ascend_kernels.gemm_loops import cdiv, descriptor_mainloop, dot_options, make_descriptors, real_rows, tile_coords
from ascend_kernels.gemm_streamk import num_cores
from ascend_kernels.gemm_table import GemmConfig
from ascend_kernels.launch_cache import LaunchCache


@triton.jit(do_not_specialize=["num_rows"])
def persistent_gemm_kernel(
    x_ptr,  # [num_rows, K] activations, unit inner stride
    w_ptr,  # [N, K] (Linear) or [K, N] (Conv1D), unit inner stride
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [num_rows, N] x's dtype, unit inner stride
    num_tokens_ptr,  # [1] int32 real M (read only when M_FROM_DEVICE)
    num_rows,  # rows of x / out (the bucket, or the real M)
    N,
    K,
    stride_xm,
    stride_wk,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    M_FROM_DEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the CPU interpreter gets bf16 tl.dot wrong: upcast operands there
    INPUT_PRECISION: tl.constexpr,
    W_KN: tl.constexpr,  # weight stored [K, N]
    WARP_SPEC: tl.constexpr,  # automatic warp specialisation of the tile loop
):
    M = real_rows(num_tokens_ptr, num_rows, M_FROM_DEVICE)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    # No descriptor spans an empty matrix: at M = 0 they span row 0 and the tile loop does not run.
    # (No early return either: Triton 3.6's warp specialisation rejects that branch.)
    rows = tl.maximum(M, 1)
    x_desc, w_desc = make_descriptors(x_ptr, w_ptr, rows, N, K, stride_xm, stride_wk, stride_wn, BLOCK_M, BLOCK_N,
                                      BLOCK_K, W_KN)  # fmt: skip
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[rows, N], strides=[stride_om, 1],
                                         block_shape=[BLOCK_M, BLOCK_N])  # fmt: skip
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WARP_SPEC):
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = descriptor_mainloop(x_desc, w_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0, K, BLOCK_K, W_KN,
                                  DOT_FP32, INPUT_PRECISION)  # fmt: skip
        if HAS_BIAS:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_ptr.dtype.element_ty))


_LAUNCH = LaunchCache(persistent_gemm_kernel)  # eager calls skip Triton's per-call binding (launch_cache.py)


def persistent_gemm(
    x2d: torch.Tensor,  # [rows, K], unit inner stride
    weight: torch.Tensor,  # [N, K] or [K, N], unit inner stride
    bias: Optional[torch.Tensor],  # [N]
    out2d: torch.Tensor,  # [rows, N], unit inner stride
    num_tokens: Optional[torch.Tensor],  # int32 [1] or None
    weight_kn: bool,
    cfg: GemmConfig,
) -> None:
    """Grid = cores x cfg.persistent programs (fewer when the bucket has fewer tiles)."""
    rows, k = x2d.shape
    n = out2d.shape[1]
    if cfg.persistent < 1:
        raise ValueError(f"SmoothGEMM persistent: needs persistent >= 1, got {cfg}")
    stride_wk, stride_wn = weight.stride() if weight_kn else weight.stride()[::-1]
    dot_fp32, precision = dot_options(x2d)
    tiles = cdiv(rows, cfg.block_m) * cdiv(n, cfg.block_n)
    programs = min(num_cores(x2d.device) * cfg.persistent, tiles)
    _LAUNCH((programs,),
        x2d, weight, bias if bias is not None else out2d, out2d,
        num_tokens if num_tokens is not None else out2d,
        rows, n, k,
        x2d.stride(0), stride_wk, stride_wn, out2d.stride(0),
        HAS_BIAS=bias is not None, M_FROM_DEVICE=num_tokens is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, W_KN=weight_kn,
        WARP_SPEC=cfg.warp_spec and x2d.element_size() == 2,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
