"""Residual add + RMSNorm over rows, HF's eager roundings: the fallback of the fused norm-linear op
for batches larger than NormGEMV's row tile (prefill), one launch instead of the eager chain.

    h = x + residual            (model dtype)      -> h_out (the next residual stream)
    a = w * (h * rsqrt(mean(h^2) + eps))           -> out   (normalised in fp32, rounded, then w)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(
    x_ptr,  # [M, K]
    res_ptr,  # [M, K] (read only when HAS_RESIDUAL)
    h_ptr,  # [M, K] out: x + residual (written only when HAS_RESIDUAL)
    w_ptr,  # [K] norm weight
    out_ptr,  # [M, K]
    K,
    eps,
    stride_xm,
    stride_rm,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= K: one row per program
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    h = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_rm + offs, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * K + offs, h, mask=ok)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / K + eps)
    a = (hf * rstd).to(h.dtype)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row * K + offs, (a.to(tl.float32) * w.to(tl.float32)).to(h.dtype), mask=ok)


def add_rms_norm(
    x: torch.Tensor,  # [..., K]
    residual: Optional[torch.Tensor],  # [..., K] or None
    weight: torch.Tensor,  # [K]
    eps: float,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # (normalised [..., K], x + residual or None)
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    r2d = residual.reshape(-1, k).contiguous() if residual is not None else x2d
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if x2d.shape[0]:
        add_rms_norm_kernel[(x2d.shape[0],)](
            x2d, r2d, h if h is not None else out, weight, out, k, float(eps), x2d.stride(0), r2d.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_K=triton.next_power_of_2(k), num_warps=4 if k <= 4096 else 8,
        )  # fmt: skip
    return out, h
