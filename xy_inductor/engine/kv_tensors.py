"""The paged KV cache tensors: how many blocks fit, and one K and one V tensor per layer.

    k_caches[layer]: [num_blocks, block_size, num_kv_heads, head_dim]   (v: ..., value_dim)

The block ids the KV manager hands out index the first dimension of every layer's tensors.
"""
from __future__ import annotations

import torch

from xy_inductor.config import EngineConfig
from xy_inductor.engine.model_check import LayerSpec

_CPU_KV_BYTES = 2 << 30  # default KV pool cap on CPU, where memory is shared with everything else


def bytes_per_block(layers: list[LayerSpec], block_size: int) -> int:
    """K + V bytes of one block across all layers."""
    return sum(block_size * s.num_kv_heads * (s.head_dim + s.value_dim) * s.dtype.itemsize for s in layers)


def num_kv_blocks(layers: list[LayerSpec], config: EngineConfig, max_model_len: int, device: torch.device) -> int:
    """config.num_kv_blocks, else a share of free device memory (CUDA) or a capped pool (CPU);
    never fewer than one max_model_len request needs."""
    per_seq = -(-max_model_len // config.block_size)
    num = config.num_kv_blocks
    if num is None:
        per_block = bytes_per_block(layers, config.block_size)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            num = int(free * config.kv_cache_memory_fraction) // per_block
        else:
            num = min(per_seq * (config.max_num_seqs or 64), _CPU_KV_BYTES // per_block)
            num = max(num, per_seq)
    if num < per_seq:
        raise ValueError(
            f"xyserve: {num} KV blocks of {config.block_size} tokens cannot hold one request of max_model_len "
            f"{max_model_len} ({per_seq} blocks); give more blocks or lower max_model_len"
        )
    return num


def allocate_kv_caches(layers: list[LayerSpec], num_blocks: int, block_size: int,
                       device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed K and V caches, one pair per layer, in each layer's dtype. When every layer has one
    spec, each list is the slices of one [num_layers, ...] tensor (a kernel that runs all layers in
    one launch, decode_kernel.py, reads it through one pointer)."""
    if all(s == layers[0] for s in layers):
        s = layers[0]
        shape = (len(layers), num_blocks, block_size, s.num_kv_heads)
        k_all = torch.zeros(*shape, s.head_dim, dtype=s.dtype, device=device)
        v_all = torch.zeros(*shape, s.value_dim, dtype=s.dtype, device=device)
        return list(k_all.unbind(0)), list(v_all.unbind(0))
    k, v = [], []
    for s in layers:
        shape = (num_blocks, block_size, s.num_kv_heads)
        k.append(torch.zeros(*shape, s.head_dim, dtype=s.dtype, device=device))
        v.append(torch.zeros(*shape, s.value_dim, dtype=s.dtype, device=device))
    return k, v
