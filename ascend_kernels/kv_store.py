"""Store a step's new K/V rows into the paged caches at their slots (one launch for K and V).

slot = block * block_size + offset; viewed as [num_blocks * block_size, Hkv, D], a slot is one
row of the cache. A negative slot marks a padding row of a virtually padded bucket: skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend_kernels import reference
from ascend_kernels.profiles import interpreting, next_power_of_2


@triton.jit
def store_kv_kernel(
    key_ptr,  # [T, Hkv, D]
    value_ptr,  # [T, Hkv, Dv]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, Dv]
    slot_ptr,  # [T] int32/int64 slot_mapping
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        keep = (h < NUM_HEADS) & (d < HEAD_DIM)
        k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=keep)
        tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d,
                 k.to(k_cache_ptr.dtype.element_ty), mask=keep)
        dv = tl.arange(0, BLOCK_DV)[None, :]
        keep_v = (h < NUM_HEADS) & (dv < HEAD_DIM_V)
        v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + dv, mask=keep_v)
        tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + dv,
                 v.to(v_cache_ptr.dtype.element_ty), mask=keep_v)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """In place: k_cache/v_cache rows at slot_mapping[t] <- key[t]/value[t] (negative slot skipped)."""
    if key.device.type == "cpu" and not interpreting():
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    if key.dim() != 3 or k_cache.dim() != 4 or key.shape[1:] != k_cache.shape[2:] or value.shape[1:] != v_cache.shape[2:]:
        raise ValueError(f"xyserve: store_kv shapes key {tuple(key.shape)} / cache {tuple(k_cache.shape)} disagree")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("xyserve: store_kv writes in place and needs caches with a unit last stride")
    if key.shape[0] == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    num_heads, head_dim, dim_v = key.shape[1], key.shape[2], value.shape[2]
    store_kv_kernel[(key.shape[0],)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_V=dim_v,
        BLOCK_H=next_power_of_2(num_heads), BLOCK_D=next_power_of_2(head_dim), BLOCK_DV=next_power_of_2(dim_v),
    )
