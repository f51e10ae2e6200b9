"""NormGEMV: a decode-sized linear with the decoder's residual add and RMSNorm as its prologue and,
for an MLP's gate/up projection, SiLU(gate) x up as its epilogue.

At batch 1 a Llama layer is ten short kernels; the RMSNorms (with the residual add Inductor fuses
into them) and SiLU x up are three of them, each a few microseconds of launch and latency for a
few kilobytes of work. Here they ride inside the GEMV that follows them:

    x ──(+ residual)──> h ──RMSNorm(w_norm)──> a ──@ W^T──> out          (h stored once: it is the
                         │                                                 next residual stream)
                         └──────────────────────────────────> h_out

    GATED:  W = [W_gate; W_up]  (2N x K, rows back to back)   out = silu(a @ W_gate^T) * (a @ W_up^T)

Every program (BLOCK_N output columns) re-reads the few rows of x (<= BLOCK_M, L2-hot) and computes
the norm itself, so no program waits for another. It does so in one pass over K: the products use
x * w_norm and are scaled by each row's 1/rms after the dot (rows' sums of squares come from the
same loop). HF rounds x / rms to the model dtype before w_norm; this rounds x * w_norm instead, so
16-bit results differ from eager in the last bits (as Inductor's fused norms do). fp16 is left to
the fallback: unnormalised x * w_norm may overflow it.

Measured on an H100 (benchmarks/RESULTS.md): 16 Llama-3.2-1B layers without attention in one CUDA
graph run 4% faster than Inductor's norms + cuBLAS, but the whole engine decodes 2-3% slower with
it (the GEMV itself is slower than cuBLAS's: q/k/v 8.4 vs 7.4 us), so it is opt-in.

On Hopper+ the kernel is launched with programmatic dependent launch: the next kernel's programs
are allowed to launch once this one has its inputs (they wait for it in `gdc_wait`), which hides
launch latency between back-to-back decoder kernels. Prefetching the weights into L2 before the
wait was measured and is slower (benchmarks/RESULTS.md). Elsewhere (the CPU interpreter, Ascend)
the kernel runs without the wait.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ascend_kernels import reference
from ascend_kernels.gemm_loops import cuda_capability, dot_options
from ascend_kernels.profiles import interpreting

MAX_ROWS = 16  # one row tile (the tensor cores' smallest M); larger batches take the fallback


@triton.jit
def _residual_rows(x_ptr, res_ptr, offs_m, offs_k, row_ok, k_ok, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr):
    """h = x (+ residual) for a [BLOCK_M, BLOCK_K] tile, rounded to the model dtype like HF's add."""
    ok = row_ok[:, None] & k_ok[None, :]
    h = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    return h


@triton.jit(do_not_specialize=["num_rows"])
def norm_gemv_kernel(
    x_ptr,  # [num_rows, K] input of the residual add (or of the norm, without HAS_RESIDUAL)
    res_ptr,  # [num_rows, K] residual stream (read only when HAS_RESIDUAL)
    h_ptr,  # [num_rows, K] out: x + residual, the new residual stream (written only when HAS_RESIDUAL)
    norm_w_ptr,  # [K] RMSNorm weight
    w_ptr,  # [N, K] Linear weight; GATED: [2N, K], gate rows then up rows
    out_ptr,  # [num_rows, N]
    num_rows,
    N,
    K,
    eps,
    stride_xm,
    stride_rm,
    stride_wn,
    HAS_RESIDUAL: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the CPU interpreter gets bf16 tl.dot wrong: upcast operands there
    INPUT_PRECISION: tl.constexpr,  # of the weight products ("ieee" for fp32 models)
    SQ_PRECISION: tl.constexpr,  # of the squares' sums (fp32 operands: tf32 is plenty, ieee for fp32 models)
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (CUDA sm_90+)
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    col_ok = offs_n < N
    row_ok = offs_m < num_rows
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x and the residual come from the previous kernels
        # Let the next kernel's programs launch and wait on us: hides its launch latency.
        tl.extra.cuda.gdc_launch_dependents()

    # One pass over K: rstd scales whole rows, so it is applied after the dot. The squares are
    # summed by the tensor cores too (h^2 @ ones): no cross-thread reduction inside the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    ones = tl.full((BLOCK_K, 16), 1.0, tl.float32)
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        h = _residual_rows(x_ptr + k, res_ptr + k, offs_m, offs_k, row_ok, k_ok, stride_xm, stride_rm, HAS_RESIDUAL)
        hf = h.to(tl.float32)
        acc_sq = tl.dot(hf * hf, ones, acc_sq, input_precision=SQ_PRECISION)
        g = tl.load(norm_w_ptr + k + offs_k, mask=k_ok, other=0.0)
        a = (hf * g.to(tl.float32)[None, :]).to(h.dtype)
        w_ok = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptrs + k, mask=w_ok, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if GATED:
            u = tl.load(w_ptrs + N * stride_wn + k, mask=w_ok, other=0.0)
            if DOT_FP32:
                u = u.to(tl.float32)
            acc_up = tl.dot(a, u, acc_up, input_precision=INPUT_PRECISION)

    rstd = tl.rsqrt(tl.max(acc_sq, axis=1) / K + eps)  # every column of acc_sq holds the row's sum
    if HAS_RESIDUAL:
        if pid == 0:  # one program writes the new residual stream (L2-hot re-read of a few rows)
            for k in range(0, K, BLOCK_K):
                k_ok = (k + offs_k) < K
                h = _residual_rows(x_ptr + k, res_ptr + k, offs_m, offs_k, row_ok, k_ok, stride_xm, stride_rm,
                                   HAS_RESIDUAL)
                tl.store(h_ptr + offs_m[:, None] * K + (k + offs_k)[None, :], h, mask=row_ok[:, None] & k_ok[None, :])
    out_ty = out_ptr.dtype.element_ty
    acc = acc * rstd[:, None]
    if GATED:
        gate = acc.to(out_ty).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ty)  # SiLU, rounded as torch rounds F.silu
        acc = act.to(tl.float32) * (acc_up * rstd[:, None]).to(out_ty).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.cache
def _smem_budget(index: int) -> int:
    """Shared memory a program may use (the CPU interpreter has no limit: a Hopper-sized one)."""
    if index < 0:
        return 227 * 1024
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024)


def fit_tiles(block_n: int, block_k: int, num_stages: int, gated: bool, element_size: int,
              budget: int) -> tuple[int, int]:
    """(block_k, num_stages) whose pipelined stages (x tile + one or two weight tiles) fit `budget`
    bytes with room for the epilogue: fp32 weights halve the K tile of the 16-bit default."""
    def stage_bytes(bk):
        return (MAX_ROWS + block_n * (2 if gated else 1)) * bk * element_size

    while block_k > 16 and stage_bytes(block_k) * num_stages > budget - 8 * 1024:
        if num_stages > 2:
            num_stages -= 1
        else:
            block_k //= 2
    return block_k, num_stages


def _check(x, residual, norm_weight, weight, gated):
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or norm_weight.shape != (k,):
        raise ValueError(f"NormGEMV: x [..., {k}], norm weight {tuple(norm_weight.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit")  # fmt: skip
    if gated and weight.shape[0] % 2:
        raise ValueError(f"NormGEMV: a gated weight stacks gate and up rows; got {weight.shape[0]} rows")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"NormGEMV: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if not (x.dtype == weight.dtype == norm_weight.dtype) or (residual is not None and residual.dtype != x.dtype):
        raise TypeError("NormGEMV: x, residual, norm weight and weight must share one dtype")
    if weight.stride(1) != 1 or norm_weight.stride(0) != 1:
        raise ValueError("NormGEMV: weight rows and the norm weight must be contiguous")


def norm_gemv(
    x: torch.Tensor,  # [..., K], at most MAX_ROWS rows
    residual: Optional[torch.Tensor],  # [..., K] or None
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]; gated: [2N, K]
    gated: bool,
    use_pdl: Optional[bool] = None,  # None: on CUDA sm_90+
    block_n: Optional[int] = None,  # None: 32 (64 when gated)
    block_k: Optional[int] = None,  # None: 512 bytes of each weight row per stage
    num_warps: int = 4,
    num_stages: Optional[int] = None,  # None: 4 (3 when gated); both shrink to fit shared memory
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # (out [..., N], h [..., K] or None)
    """out = linear(rmsnorm(x + residual)) (gated: SiLU(gate) * up), and h = x + residual."""
    _check(x, residual, norm_weight, weight, gated)
    return _launch(x, residual, norm_weight, eps, weight, gated, use_pdl, block_n, block_k, num_warps, num_stages)


def _launch(x, residual, norm_weight, eps, weight, gated, use_pdl, block_n, block_k, num_warps, num_stages):
    """norm_gemv past its checks."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    rows = x2d.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"NormGEMV: at most {MAX_ROWS} rows, got {rows}; use the fallback")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if rows == 0:
        return out, h
    r2d = residual.reshape(-1, k) if residual is not None else x2d
    if r2d.stride(1) != 1:
        r2d = r2d.contiguous()
    if use_pdl is None:
        use_pdl = x.is_cuda and not interpreting() and cuda_capability(x.device.index) >= 9
    dot_fp32, precision = dot_options(x2d)
    block_n = block_n or (64 if gated else 32)
    budget = _smem_budget(x.device.index if x.is_cuda else -1)
    block_k, num_stages = fit_tiles(block_n, block_k or 512 // x.element_size(), num_stages or (3 if gated else 4),
                                    gated, x.element_size(), budget)  # fmt: skip
    extra = {"launch_pdl": True} if use_pdl else {}
    norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x2d, r2d, h if h is not None else out, norm_weight, weight, out,
        rows, n, k, float(eps), x2d.stride(0), r2d.stride(0), weight.stride(0),
        HAS_RESIDUAL=residual is not None, GATED=gated, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, SQ_PRECISION=precision or "tf32", USE_PDL=use_pdl,
        num_warps=num_warps, num_stages=num_stages, **extra,
    )  # fmt: skip
    return out, h


def norm_linear(
    x: torch.Tensor,  # [..., K]
    residual: Optional[torch.Tensor],  # [..., K] or None
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]; gated: [2N, K]
    gated: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # (out [..., N], x + residual or None)
    """Batches of up to MAX_ROWS rows (decode) in bf16 / fp32 take the fused kernel; larger ones
    (prefill) or fp16 take one add + RMSNorm kernel, the vendor GEMM and SiLU x up."""
    _check(x, residual, norm_weight, weight, gated)
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float32):
        return _launch(x, residual, norm_weight, eps, weight, gated, None, None, None, 4, None)
    from ascend_kernels.rms_norm import add_rms_norm

    a, h = add_rms_norm(x, residual, norm_weight, eps)
    return reference.gated_linear(a, weight, gated), h
