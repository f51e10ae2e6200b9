"""`torch.ops.xyserve.*`: custom ops with fake implementations.

Every op takes an `impl` string chosen when the graph is lowered:
  "auto"      Triton on CUDA/NPU tensors, the pure-torch reference elsewhere
  "triton"    always Triton (on CPU tensors this needs TRITON_INTERPRET=1)
  "reference" always the pure-torch reference
The real implementations always return contiguous outputs so the fake ones can promise exactly
that (Inductor checks sizes and strides against the fake implementation).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ascend_kernels import reference

IMPLS = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(impl: str, t: Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"xyserve: unknown kernel impl {impl!r}; expected one of {IMPLS}")
    if impl == "reference":
        return False
    if impl == "triton":
        return True
    return t.device.type in ("cuda", "npu") and triton_available()


# ---------------------------------------------------------------- gemm
@torch.library.custom_op("xyserve::gemm", mutates_args=())
def gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_kn: bool, impl: str) -> Tensor:
    """x [..., K] times an HF Linear weight [N, K] (weight_kn=False) or a Conv1D weight [K, N]."""
    if use_triton(impl, x):
        from ascend_kernels import gemm as smooth

        # "auto": the tuned table may dispatch to cuBLAS (and does for shapes it has not tuned);
        # "triton" asks for the Triton primitives themselves
        out = smooth.smooth_gemm(x, weight, bias, weight_kn, allow_cublas=impl != "triton")
    else:
        out = reference.gemm(x, weight, bias, weight_kn)
    return out.contiguous()


@gemm.register_fake
def _(x, weight, bias, weight_kn, impl):
    n = weight.shape[1] if weight_kn else weight.shape[0]
    return x.new_empty(*x.shape[:-1], n)


# ---------------------------------------------------------------- residual add + RMSNorm + linear
@torch.library.custom_op("xyserve::norm_linear", mutates_args=())
def norm_linear(
    x: Tensor,
    residual: Optional[Tensor],
    norm_weight: Tensor,
    eps_tensor: Optional[Tensor],
    eps: float,
    weight: Tensor,
    gated: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """(out, h): h = x + residual; out = linear(rmsnorm(h) * norm_weight, weight [N, K]), or with
    `gated` (weight = [W_gate; W_up]) SiLU(gate) * up. Without a residual h is an empty tensor.
    eps_tensor (a 0-d CPU tensor: how Dynamo passes a module's float under dynamic shapes) wins
    over eps."""
    if eps_tensor is not None:
        eps = float(eps_tensor.item())
    if use_triton(impl, x):
        from ascend_kernels import norm_gemv

        out, h = norm_gemv.norm_linear(x, residual, norm_weight, eps, weight, gated)
    else:
        out, h = reference.norm_linear(x, residual, norm_weight, eps, weight, gated)
    return out.contiguous(), (h.contiguous() if h is not None else x.new_empty(0))


@norm_linear.register_fake
def _(x, residual, norm_weight, eps_tensor, eps, weight, gated, impl):
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], n), h


# ---------------------------------------------------------------- dense attention
@torch.library.custom_op("xyserve::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: Optional[float], is_causal: bool, impl: str
) -> Tensor:
    """SDPA semantics: q [B, Hq, S, D], k/v [B, Hkv, L, D] (GQA when Hkv < Hq), mask bool or additive."""
    if use_triton(impl, q):
        from ascend_kernels import attention as meta

        out = meta.dense_attention(q, k, v, mask, scale, is_causal)
    else:
        out = reference.dense_attention(q, k, v, mask, scale, is_causal)
    return out.contiguous()


@attention.register_fake
def _(q, k, v, mask, scale, is_causal, impl):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


# ---------------------------------------------------------------- paged KV cache
@torch.library.custom_op("xyserve::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A contiguous copy Inductor cannot fuse through: `x` is computed once and its consumers read
    it, instead of each one recomputing x's pointwise chain (lowering/shared_tables.py)."""
    return x.clone(memory_format=torch.contiguous_format)


@materialize.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("xyserve::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, impl: str) -> None:
    """Write a step's new K/V [T, Hkv, D] into the paged caches at slot_mapping [T] (negative = skip)."""
    if use_triton(impl, key):
        from ascend_kernels import kv_store

        kv_store.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


@store_kv.register_fake
def _(key, value, k_cache, v_cache, slot_mapping, impl):
    return None


@torch.library.custom_op("xyserve::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_table: Tensor,
    scale: float,
    tree_mask: Optional[Tensor],
    task_table: Optional[Tensor],
    impl: str,
) -> Tensor:
    """One launch for a mixed prefill / decode / verify batch; see reference.paged_attention."""
    if use_triton(impl, q):
        from ascend_kernels import attention as meta

        out = meta.paged_attention(
            q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, tree_mask, task_table
        )
    else:
        out = reference.paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, tree_mask)
    return out.contiguous()


@paged_attention.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, tree_mask, task_table, impl):
    return q.new_empty(*q.shape[:-1], v_cache.shape[-1])
