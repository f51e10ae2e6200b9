"""SmoothGEMM: y = x @ W (+ b) with virtual padding over a fixed set of tile primitives.

Only M (tokens in the batch) changes at run time; N and K come from the model. Tiles are
allocated on chip in whole BLOCK_M x BLOCK_N blocks, but loads read only the real rows and stores
write only the real rows: nothing is padded in memory. M is never a constexpr nor specialised
(`do_not_specialize`, or read from a device tensor), so a new M never compiles a new kernel; the
tuned table (gemm_table.py) only picks one of a few configurations per M range.

With `num_tokens` (int32 [1] on the device) the grid is sized for the bucket (x's rows) while
the kernel reads the real M from memory: one CUDA graph then serves every M of the bucket, and the
programs past the real tiles exit at once. The persistent stream-K primitive (gemm_streamk.py) has
a fixed grid (the cores) and reads M the same way, as do the persistent tiles for large M
(gemm_persistent.py: whole tiles per program, TMA stores), the row-owner GEMV for one to four
tokens (gemv_rows.py and gemv_rows_fma.py: plain loads and FMAs, no tensor cores) and the swap-AB
tiles (weight rows on the MMA's M side; gemm_swap_hopper.py on sm_90).

Where the tuned table says cuBLAS is faster for an M range, `smooth_gemm` calls F.linear instead
(allow_cublas=False forces the Triton primitives). cuBLAS has no virtual padding: with
`num_tokens` it computes the whole bucket, and the rows past the real M then hold whatever the
padded rows of x produce (garbage, never to be relied on; Triton leaves them untouched).
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ascend_kernels.arrival_counters import arrival_counters
from ascend_kernels.gemm_loops import (
    cdiv, descriptor_mainloop, dot_options, make_descriptors, masked_mainloop, real_rows, tile_coords, tma_ok,
)  # fmt: skip
from ascend_kernels.gemm_persistent import persistent_gemm
from ascend_kernels.gemm_streamk import smooth_gemm_streamk
from ascend_kernels.gemm_table import GemmConfig, device_key, lookup
from ascend_kernels.gemv_rows import gemv_rows
from ascend_kernels.launch_cache import LaunchCache



@triton.jit(do_not_specialize=["num_rows"])
def smooth_gemm_kernel(
    x_ptr,  # [num_rows, K] activations, any strides
    w_ptr,  # [N, K] (Linear) or [K, N] (Conv1D), read through stride_wk / stride_wn
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [num_rows, N] x's dtype
    partials_ptr,  # [tiles, SPLIT_K, BLOCK_M, BLOCK_N] fp32 split-K partials (read only when SPLIT_K > 1)
    counters_ptr,  # [>= tiles] int32 arrivals per tile, zero between launches (SPLIT_K > 1)
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: no K masks
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no N masks
    DOT_FP32: tl.constexpr,  # the CPU interpreter gets bf16 tl.dot wrong: upcast operands there
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # tensor descriptors (bulk copies on Hopper); needs unit inner strides
    W_KN: tl.constexpr,  # weight stored [K, N] (only the descriptor path needs to know)
    SWAP_AB: tl.constexpr,  # accumulate out^T: the weight tile is the MMA's M side (gemm_loops.mma)
):
    M = real_rows(num_tokens_ptr, num_rows, M_FROM_DEVICE)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    # Tiles of padded rows: the grid covers the bucket, the work covers only the real M.
    if pid >= num_pid_m * num_pid_n:
        return
    pid_m, pid_n = tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < N
    # Split-K: program (pid, pid_k) reduces one contiguous slice of whole K tiles.
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        x_desc, w_desc = make_descriptors(x_ptr, w_ptr, M, N, K, stride_xm, stride_wk, stride_wn, BLOCK_M, BLOCK_N,
                                          BLOCK_K, W_KN)
        acc = descriptor_mainloop(x_desc, w_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, k_start, k_end, BLOCK_K,
                                  W_KN, DOT_FP32, INPUT_PRECISION, SWAP_AB)
    else:
        acc = masked_mainloop(x_ptr, w_ptr, acc, offs_m, offs_n, row_ok, col_ok, k_start, k_end,
                              stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K, EVEN_K, EVEN_N,
                              DOT_FP32, INPUT_PRECISION, SWAP_AB)  # fmt: skip
    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]: partials and the store below see one layout

    if SPLIT_K > 1:
        # Publish this slice's partial; the tile's last slice to arrive sums all of them in slice
        # order (the same bits whatever the arrival order) and stores the tile: one launch, no
        # zeroed workspace, no finishing kernel.
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_base = pid.to(tl.int64) * SPLIT_K * (BLOCK_M * BLOCK_N)
        tl.store(partials_ptr + tile_base + tl.program_id(1) * (BLOCK_M * BLOCK_N) + offs, acc)
        tl.debug_barrier()  # every thread's partial precedes the release below
        arrived = tl.atomic_add(counters_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived != SPLIT_K - 1:
            return
        tl.debug_barrier()
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(SPLIT_K):  # .cg: read at L2, where the other programs' stores are
            acc += tl.load(partials_ptr + tile_base + s * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
        tl.atomic_xchg(counters_ptr + pid, 0, sem="relaxed", scope="gpu")  # zero for the next launch
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


_LAUNCH = LaunchCache(smooth_gemm_kernel)  # eager calls skip Triton's per-call binding (launch_cache.py)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], weight_kn: bool) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"SmoothGEMM: weight must be 2-D, got {tuple(weight.shape)}")
    k, n = weight.shape if weight_kn else weight.shape[::-1]
    if x.shape[-1] != k:
        raise ValueError(f"SmoothGEMM: x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"SmoothGEMM: x {x.dtype} and weight {weight.dtype} must share a float dtype")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"SmoothGEMM: bias must be [{n}], got {tuple(bias.shape)}")
    return n, k


def smooth_gemm(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] (weight_kn=False) or [K, N] (weight_kn=True)
    bias: Optional[torch.Tensor],  # [N] or None
    weight_kn: bool,
    num_tokens: Optional[torch.Tensor] = None,  # int32 [1]: real M; Triton leaves rows past it untouched
    out: Optional[torch.Tensor] = None,  # [..., N] contiguous, x's dtype
    config: Optional[GemmConfig] = None,  # force one primitive (tests, tuner); CUBLAS forces F.linear
    allow_cublas: bool = True,  # False: Triton primitives even where the table prefers cuBLAS
) -> torch.Tensor:  # [..., N] contiguous, x's dtype
    """x @ W^T + b (Linear) or x @ W + b (Conv1D); fp32 accumulation; see the module doc."""
    n, k = _check(x, weight, bias, weight_kn)
    x2d = x.reshape(-1, k)  # a view when the leading dims allow it; strides go to the kernel
    rows = x2d.shape[0]
    if out is not None and (out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError("SmoothGEMM: out must be a contiguous [..., N] tensor of x's dtype")
    if num_tokens is not None and (num_tokens.numel() != 1 or num_tokens.device != x.device):
        raise ValueError("SmoothGEMM: num_tokens must be a 1-element int tensor on x's device")
    if config is None:
        gpu = device_key(x.get_device()) if x.is_cuda else "cpu"
        cfg = _planned(n, k, rows, gpu, allow_cublas, x.element_size())
    else:
        cfg = config.fitted(n, k)
    if cfg.cublas and rows > 0:
        return _cublas(x, x2d, weight, bias, weight_kn, out)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    out2d = out.view(rows, n)
    if cfg.rows and cfg.block_m == 4 and _rows_fma(x2d, weight, out2d, weight_kn, cfg):
        _rows_fma.run(x2d, weight, bias, out2d, num_tokens, cfg)
    elif cfg.rows:
        gemv_rows(x2d, weight, bias, out2d, num_tokens, weight_kn, cfg)
    elif cfg.stream_k:
        smooth_gemm_streamk(x2d, weight, bias, out2d, num_tokens, weight_kn, cfg)
    elif cfg.persistent and tma_ok(x2d, weight, out2d):
        persistent_gemm(x2d, weight, bias, out2d, num_tokens, weight_kn, cfg)
    elif cfg.swap_ab and _swap_hopper(x2d, weight, out2d, weight_kn, cfg):
        _swap_hopper.run(x2d, weight, bias, out2d, num_tokens, cfg)
    else:
        launch(x2d, weight, bias, out2d, num_tokens, weight_kn, cfg)
    return out


class _GluonKernel:
    """A Gluon kernel module (gemm_swap_hopper.py, gemv_rows_fma.py) imported on first use: a Triton
    without Gluon (another vendor's build) keeps the portable Triton form of the same config."""

    def __init__(self, module: str, ok: str, run: str):
        self.names, self.fns = (module, ok, run), None

    def __call__(self, x2d, weight, out2d, weight_kn, cfg) -> bool:
        """Whether the Gluon kernel serves `cfg` on these operands."""
        if not x2d.is_cuda:
            return False
        if self.fns is None:
            try:
                module = importlib.import_module(f"ascend_kernels.{self.names[0]}")
            except Exception:  # noqa: BLE001 - no Gluon here: the Triton form serves the config
                self.fns = ()
            else:
                self.fns = (getattr(module, self.names[1]), getattr(module, self.names[2]))
        return bool(self.fns) and self.fns[0](x2d, weight, out2d, weight_kn, cfg)

    def run(self, x2d, weight, bias, out2d, num_tokens, cfg) -> None:
        self.fns[1](x2d, weight, bias, out2d, num_tokens, cfg)


_swap_hopper = _GluonKernel("gemm_swap_hopper", "swap_hopper_ok", "swap_gemm_hopper")
_rows_fma = _GluonKernel("gemv_rows_fma", "rows_fma_ok", "gemv_rows_fma")


def _cublas(x, x2d, weight, bias, weight_kn, out) -> torch.Tensor:
    """The vendor GEMM over all of x's rows (a bucket is computed whole: no virtual padding).
    Without `out` it is exactly the call the backend would otherwise make (F.linear / addmm), so a
    range dispatched here costs what cuBLAS costs."""
    if out is None and not weight_kn:
        return F.linear(x, weight, bias)
    w = weight if weight_kn else weight.t()
    target = out.view(x2d.shape[0], -1) if out is not None else None
    if bias is None:
        y = torch.mm(x2d, w, out=target)
    else:
        y = torch.addmm(bias, x2d, w, out=target)
    return out if out is not None else y.view(*x.shape[:-1], -1)


@functools.lru_cache(maxsize=8192)
def _planned(n: int, k: int, rows: int, gpu: str, allow_cublas: bool, itemsize: int) -> GemmConfig:
    """Table read, memoised: the launch path stays a few dict lookups (decode kernels last ~10 us)."""
    return lookup(n, k, rows, gpu, allow_cublas, itemsize).fitted(n, k)


def launch(
    x2d: torch.Tensor,  # [rows, K]
    weight: torch.Tensor,  # [N, K] or [K, N]
    bias: Optional[torch.Tensor],  # [N]
    out2d: torch.Tensor,  # [rows, N] contiguous
    num_tokens: Optional[torch.Tensor],  # int32 [1] or None
    weight_kn: bool,
    cfg: GemmConfig,
) -> None:
    """Grid sized for `rows` (the bucket); the kernel itself stops at the real M."""
    rows, k = x2d.shape
    n = out2d.shape[1]
    stride_wk, stride_wn = weight.stride() if weight_kn else weight.stride()[::-1]
    dot_fp32, precision = dot_options(x2d)
    m_dev = num_tokens is not None
    use_tma = cfg.tma and tma_ok(x2d, weight)
    tiles = cdiv(rows, cfg.block_m) * cdiv(n, cfg.block_n)
    partials = counters = out2d  # not read without split-K
    if cfg.split_k > 1:  # per launch (a CUDA graph keeps it in its pool); counters are shared
        partials = torch.empty(tiles * cfg.split_k * cfg.block_m * cfg.block_n, dtype=torch.float32,
                               device=x2d.device)
        counters = arrival_counters(x2d.device, tiles)
    grid = (tiles, cfg.split_k)
    _LAUNCH(grid,
        x2d, weight, bias if bias is not None else out2d, out2d, partials, counters,
        num_tokens if m_dev else out2d,
        rows, n, k,
        x2d.stride(0), x2d.stride(1), stride_wk, stride_wn, out2d.stride(0),
        HAS_BIAS=bias is not None, M_FROM_DEVICE=m_dev,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=cfg.split_k, EVEN_K=k % (cfg.block_k * cfg.split_k) == 0, EVEN_N=n % cfg.block_n == 0,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=use_tma, W_KN=weight_kn, SWAP_AB=cfg.swap_ab,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
