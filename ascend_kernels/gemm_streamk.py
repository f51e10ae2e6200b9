"""SmoothGEMM persistent stream-K primitive: a fixed grid of one (or a few) programs per core.

The tiled primitive launches one program per output tile of the bucket: with big tiles (one per
SM at a time) a real M that needs 144 tiles of a 132-SM GPU runs a nearly empty second wave, and
few tiles over a long K (down projections at small M) leave SMs idle. Here the grid is the number
of cores times `stream_k`, whatever M is. Each program reads the real M (host int or the
`num_tokens` device tensor), counts the real tiles, and takes:

* an equal share of the ragged last wave, counted in K iterations ("units") across all programs
  (stream-K): a tile whose units land on several programs is a *split* tile;
* then whole waves of tiles, data parallel (tile sk_tiles + pid, + P, ...), the full K each.
Both kinds of work run through one loop, so the kernel holds one K loop and one set of buffers.

Split tiles are reduced without spinning: every contributor stores its fp32 partial in a workspace
slot and bumps the tile's arrival counter; the last one to arrive adds the other partials, stores
the tile and sets the counter back to zero for the next launch. No program ever waits for another,
so the order programs run in does not matter (the CPU interpreter runs them one by one).

The workspace is cached per device and shared by every launch, and so are the arrival counters
(arrival_counters.py): launches must not overlap in time (one stream, as the engine runs), and the
first launch of a config must happen outside CUDA-graph capture (as for any Triton compile).

Measured on an H200 (benchmarks/RESULTS.md, round 2): faster than the tiled primitive where K is
long and tiles are few (Llama down projections and 8B o at M <= 128, up to 1.55x); slower with big
tiles, where the fix-up path costs registers, and for kernels of a few microseconds, where every
piece pays a pipeline fill. The tuner keeps it only where it wins.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ascend_kernels.arrival_counters import arrival_counters
from ascend_kernels.gemm_loops import (
    descriptor_mainloop, dot_options, make_descriptors, masked_mainloop, real_rows, tile_coords, tma_ok,
)  # fmt: skip
from ascend_kernels.gemm_table import GemmConfig
from ascend_kernels.launch_cache import LaunchCache


@triton.jit(do_not_specialize=["num_rows"])
def smooth_gemm_streamk_kernel(
    x_ptr,  # [num_rows, K] activations, any strides
    w_ptr,  # [N, K] (Linear) or [K, N] (Conv1D), read through stride_wk / stride_wn
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [num_rows, N] x's dtype
    partials_ptr,  # [num_programs, 2, BLOCK_M, BLOCK_N] fp32: split tiles' partial sums
    counters_ptr,  # [num_programs + 1] int32, all zero between launches: arrivals per split tile
    num_tokens_ptr,  # [1] int32 real M (read only when M_FROM_DEVICE)
    num_rows,  # rows of x / out (the bucket, or the real M)
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
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no N masks
    DOT_FP32: tl.constexpr,  # the CPU interpreter gets bf16 tl.dot wrong: upcast operands there
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # tensor descriptors (bulk copies on Hopper); needs unit inner strides
    W_KN: tl.constexpr,  # weight stored [K, N]
    MAX_SPLITS: tl.constexpr,  # most programs one tile's K iterations are shared among
):
    M = real_rows(num_tokens_ptr, num_rows, M_FROM_DEVICE)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    if num_tiles == 0:  # M = 0: no descriptor over an empty matrix
        return
    iters = tl.cdiv(K, BLOCK_K)
    # The ragged last wave (all tiles when there are fewer than programs) is shared out in units,
    # a program taking at least 1 / MAX_SPLITS of a tile's K (so a tile has at most MAX_SPLITS + 1
    # pieces): one program reduces a split tile's partials serially, and every piece pays a
    # pipeline fill, so very thin pieces cost more than idle cores.
    sk_tiles = num_tiles % num_programs
    sk_units = sk_tiles * iters
    per_program = tl.maximum(tl.cdiv(sk_units, num_programs), tl.cdiv(iters, MAX_SPLITS))
    x_desc, w_desc = x_ptr, w_ptr
    if USE_TMA:  # built once per program, not per tile
        x_desc, w_desc = make_descriptors(x_ptr, w_ptr, M, N, K, stride_xm, stride_wk, stride_wn, BLOCK_M, BLOCK_N,
                                          BLOCK_K, W_KN)  # fmt: skip

    # One loop over this program's work, its stream-K pieces first, then its data-parallel tiles
    # (sk_tiles + pid, + P, ...): a single K loop in the kernel, so one set of pipeline buffers.
    unit = pid * per_program
    unit_end = tl.minimum(unit + per_program, sk_units)
    dp_tile = sk_tiles + pid
    while (unit < unit_end) | (dp_tile < num_tiles):
        in_sk = unit < unit_end
        tile = tl.where(in_sk, unit // iters, dp_tile)
        k_first = tl.where(in_sk, unit - tile * iters, 0)
        k_last = tl.where(in_sk, tl.minimum(iters, k_first + unit_end - unit), iters)
        acc = _tile_product(x_ptr, w_ptr, x_desc, w_desc, tile, k_first * BLOCK_K, tl.minimum(K, k_last * BLOCK_K),
                            M, N, num_pid_m, num_pid_n, stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_M, BLOCK_N,
                            BLOCK_K, GROUP_M, EVEN_K, EVEN_N, DOT_FP32, INPUT_PRECISION, USE_TMA, W_KN)  # fmt: skip
        if (k_first == 0) & (k_last == iters):
            _store_tile(acc, bias_ptr, out_ptr, tile, M, N, num_pid_m, num_pid_n, stride_om, HAS_BIAS, BLOCK_M,
                        BLOCK_N, GROUP_M)  # fmt: skip
        else:
            _reduce_split_tile(acc, bias_ptr, out_ptr, partials_ptr, counters_ptr, tile, pid, iters, per_program, M,
                               N, num_pid_m, num_pid_n, stride_om, HAS_BIAS, BLOCK_M, BLOCK_N, GROUP_M)  # fmt: skip
        unit = tl.where(in_sk, unit + k_last - k_first, unit)
        dp_tile = tl.where(in_sk, dp_tile, dp_tile + num_programs)


_LAUNCH = LaunchCache(smooth_gemm_streamk_kernel)  # eager calls skip Triton's per-call binding (launch_cache.py)


@triton.jit
def _tile_product(x_ptr, w_ptr, x_desc, w_desc, tile, k_start, k_end, M, N, num_pid_m, num_pid_n,
                  stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                  DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, W_KN: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] sum over K in [k_start, k_end) of one output tile (real rows only)."""
    pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        acc = descriptor_mainloop(x_desc, w_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, k_start, k_end, BLOCK_K,
                                  W_KN, DOT_FP32, INPUT_PRECISION)  # fmt: skip
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = masked_mainloop(x_ptr, w_ptr, acc, offs_m, offs_n, offs_m < M, offs_n < N, k_start, k_end,
                              stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K, EVEN_K, EVEN_N, DOT_FP32,
                              INPUT_PRECISION)  # fmt: skip
    return acc


@triton.jit
def _store_tile(acc, bias_ptr, out_ptr, tile, M, N, num_pid_m, num_pid_n, stride_om, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Epilogue: bias, cast, store of the real rows only (rows past M stay untouched)."""
    pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = (offs_m < M)[:, None] & col_ok[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _slot(program, tile, iters, per_program):
    """Workspace slot of a program's piece of a split tile: 0 when the piece opens the program's
    range (the range starts inside the tile), 1 when it closes it (the range started before)."""
    return 2 * program + (program * per_program < tile * iters).to(tl.int32)


@triton.jit
def _reduce_split_tile(acc, bias_ptr, out_ptr, partials_ptr, counters_ptr, tile, pid, iters, per_program, M, N,
                       num_pid_m, num_pid_n, stride_om, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Publish this program's partial of a split tile; the last contributor to arrive reduces."""
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(partials_ptr + _slot(pid, tile, iters, per_program) * (BLOCK_M * BLOCK_N) + offs, acc)
    # Every thread's partial is written before one thread releases the arrival (CTA barrier, then
    # a gpu-scope acq_rel atomic): whoever sees the last arrival also sees all the partials.
    tl.debug_barrier()
    first = (tile * iters) // per_program  # programs first..last hold this tile's units
    last = ((tile + 1) * iters - 1) // per_program
    # A split tile holds the start of program first + 1 strictly inside it, and no other split
    # tile does: a counter per program (plus one) serves every split tile of a launch.
    counter = counters_ptr + first + 1
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == last - first:
        tl.debug_barrier()
        for p in range(first, last + 1):
            if p != pid:
                # .cg: read at L2, where the other programs' stores are (L1 is not coherent).
                acc += tl.load(partials_ptr + _slot(p, tile, iters, per_program) * (BLOCK_M * BLOCK_N) + offs,
                               cache_modifier=".cg")  # fmt: skip
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
        _store_tile(acc, bias_ptr, out_ptr, tile, M, N, num_pid_m, num_pid_n, stride_om, HAS_BIAS, BLOCK_M, BLOCK_N,
                    GROUP_M)  # fmt: skip


@functools.cache
def num_cores(device: torch.device) -> int:
    """SMs of a CUDA device (device properties), else the target profile's core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    from ascend_kernels.profiles import profile_for

    return profile_for(device).num_cores


_WORKSPACES: dict = {}
MAX_SPLITS = 4


def _workspace(device: torch.device, programs: int, tile_elems: int) -> torch.Tensor:
    """The partials of `programs` programs of a tile size. Never freed nor regrown: a captured CUDA
    graph keeps pointing at them (the counters: arrival_counters.py)."""
    key = (device, programs, tile_elems)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.empty(programs * 2 * tile_elems, dtype=torch.float32, device=device)
    return _WORKSPACES[key]


def smooth_gemm_streamk(
    x2d: torch.Tensor,  # [rows, K]
    weight: torch.Tensor,  # [N, K] or [K, N]
    bias: Optional[torch.Tensor],  # [N]
    out2d: torch.Tensor,  # [rows, N] contiguous
    num_tokens: Optional[torch.Tensor],  # int32 [1] or None
    weight_kn: bool,
    cfg: GemmConfig,
) -> None:
    """Grid = cores x cfg.stream_k programs, for any M: the kernel reads the real M itself."""
    rows, k = x2d.shape
    n = out2d.shape[1]
    if cfg.stream_k < 1 or cfg.split_k != 1:
        raise ValueError(f"SmoothGEMM stream-K: needs stream_k >= 1 and split_k == 1, got {cfg}")
    if out2d.stride(1) != 1:
        raise ValueError("SmoothGEMM stream-K: out rows must be contiguous")
    stride_wk, stride_wn = weight.stride() if weight_kn else weight.stride()[::-1]
    dot_fp32, precision = dot_options(x2d)
    programs = num_cores(x2d.device) * cfg.stream_k
    partials = _workspace(x2d.device, programs, cfg.block_m * cfg.block_n)
    counters = arrival_counters(x2d.device, programs + 1)
    _LAUNCH((programs,),
        x2d, weight, bias if bias is not None else out2d, out2d, partials, counters,
        num_tokens if num_tokens is not None else counters,
        rows, n, k,
        x2d.stride(0), x2d.stride(1), stride_wk, stride_wn, out2d.stride(0),
        HAS_BIAS=bias is not None, M_FROM_DEVICE=num_tokens is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0, EVEN_N=n % cfg.block_n == 0,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=cfg.tma and tma_ok(x2d, weight), W_KN=weight_kn,
        MAX_SPLITS=MAX_SPLITS, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
