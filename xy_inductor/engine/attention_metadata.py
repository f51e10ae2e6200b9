"""PagedAttentionMetadata: what every attention layer of one step needs, built once per step.

It travels to the layers as the `xyserve_metadata` forward kwarg (see xy_inductor/hf.py); each
layer stores its new K/V into its paged cache, then attends over the cache in one launch for the
whole mixed batch (prefill chunks, decodes and later verifies alike).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import lowering.ops  # noqa: F401  (defines torch.ops.xyserve.*)


@dataclass(eq=False)
class PagedAttentionMetadata:
    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, D]
    v_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, Dv]
    slot_mapping: torch.Tensor  # [T] int64, cache slot of every new token (negative = padding row)
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, request b owns packed rows cu[b] .. cu[b+1]-1
    seq_lens: torch.Tensor  # [B] int32, KV length of each request including its new tokens
    block_table: torch.Tensor  # [B, max_blocks] int32
    task_table: torch.Tensor | None  # the tiling planner's Task-Table, or None to let the kernel plan
    max_model_len: int
    impl: str

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,  # [T, Hq, D]
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, Dv]
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, Dv]
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        torch.ops.xyserve.store_kv(key, value, k_cache, v_cache, self.slot_mapping, self.impl)
        return torch.ops.xyserve.paged_attention(
            query,  # a [T, Hq, D] view; the kernels take its strides
            k_cache,
            v_cache,
            self.cu_seqlens_q,
            self.seq_lens,
            self.block_table,
            scale,
            None,
            self.task_table,
            self.impl,
        )
