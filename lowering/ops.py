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
from typing import Callable, Optional

import torch
from torch import Tensor

from ascend_kernels import reference

IMPLS = ("auto", "triton", "reference")

# The ops are defined with a plain Library, not torch.library.custom_op: custom_op's Python layers
# (autograd wrapper, aliasing checks, Dynamo-disable wrapper) cost ~50 us a call, which an Inductor
# graph launched without CUDA graphs pays on every lowered linear. Here a call is one Python kernel.
_LIB = torch.library.Library("xyserve", "DEF")


class _NoBackward(torch.autograd.Function):
    """Runs an op whose inputs need gradients; its backward says the op has none."""

    @staticmethod
    def forward(ctx, op: torch._ops.OpOverload, *args):
        ctx.name = op._schema.name
        return op(*args)  # grad is off in here: the Autograd kernel's plain path

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name} is inference-only and has no backward; run the model under "
                           "torch.no_grad() or torch.inference_mode()")


def _needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


# Plain tensors and no dispatch mode: the Autograd kernel may run the kernel itself. Fake tensors
# (tracing), functional tensors, other subclasses and any dispatch mode go through the dispatcher.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain_no_grad(args: tuple) -> bool:
    if torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN_TYPES or (grad and a.requires_grad)):
            return False
    return True


def _op(mutates_args: tuple[str, ...] = ()) -> Callable:
    """Define `xyserve::<fn name>` from fn's annotated signature, with fn as its kernel for every
    backend. Ops that mutate nothing also get an Autograd kernel that skips the dispatcher's second
    trip for plain tensors that need no gradient (the usual case: a compiled graph runs its ops
    without grad), and otherwise runs the op below autograd, under an autograd.Function whose
    backward raises when a gradient is needed. Mutating ops keep the dispatcher's autograd
    fallback, which bumps the mutated tensors' version counters."""
    def define(fn: Callable) -> torch._ops.OpOverload:
        name = fn.__name__
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        op = getattr(torch.ops.xyserve, name).default
        if not mutates_args:
            def autograd_kernel(*args):
                if _plain_no_grad(args):
                    return fn(*args)
                if _needs_grad(args):
                    return _NoBackward.apply(op, *args)
                with torch._C._AutoDispatchBelowAutograd():
                    return op(*args)
            _LIB.impl(name, autograd_kernel, "Autograd")
        return op
    return define


def _fake(op: torch._ops.OpOverload) -> Callable:
    return torch.library.register_fake(op, lib=_LIB)


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
@_op()
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


@_fake(gemm)
def _(x, weight, bias, weight_kn, impl):
    n = weight.shape[1] if weight_kn else weight.shape[0]
    return x.new_empty(*x.shape[:-1], n)


# ---------------------------------------------------------------- residual add + RMSNorm + linear
@_op()
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


@_fake(norm_linear)
def _(x, residual, norm_weight, eps_tensor, eps, weight, gated, impl):
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], n), h


# ---------------------------------------------------------------- dense attention
@_op()
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


@_fake(attention)
def _(q, k, v, mask, scale, is_causal, impl):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


# ---------------------------------------------------------------- paged KV cache
@_op()
def materialize(x: Tensor) -> Tensor:
    """A contiguous copy Inductor cannot fuse through: `x` is computed once and its consumers read
    it, instead of each one recomputing x's pointwise chain (lowering/shared_tables.py)."""
    return x.clone(memory_format=torch.contiguous_format)


@_fake(materialize)
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_op(mutates_args=("k_cache", "v_cache"))
def store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, impl: str) -> None:
    """Write a step's new K/V [T, Hkv, D] into the paged caches at slot_mapping [T] (negative = skip)."""
    if use_triton(impl, key):
        from ascend_kernels import kv_store

        kv_store.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


@_fake(store_kv)
def _(key, value, k_cache, v_cache, slot_mapping, impl):
    return None


@_op()
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


@_fake(paged_attention)
def _(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, tree_mask, task_table, impl):
    return q.new_empty(*q.shape[:-1], v_cache.shape[-1])
