"""KV cache tensors: pool sizing and allocation (engine/kv_tensors.py)."""
from __future__ import annotations

import pytest
import torch

from xy_inductor.config import EngineConfig
from xy_inductor.engine.kv_tensors import allocate_kv_caches, bytes_per_block, num_kv_blocks
from xy_inductor.engine.model_check import LayerSpec

CPU = torch.device("cpu")
LAYERS = [LayerSpec(4, 2, 16, 16, torch.float32), LayerSpec(4, 2, 16, 8, torch.bfloat16)]


def test_bytes_per_block_counts_k_and_v_of_every_layer():
    assert bytes_per_block(LAYERS, 8) == 8 * 2 * (16 + 16) * 4 + 8 * 2 * (16 + 8) * 2


def test_pool_size_given_or_sized_and_never_below_one_request():
    assert num_kv_blocks(LAYERS, EngineConfig(block_size=8, num_kv_blocks=50), 320, CPU) == 50
    sized = num_kv_blocks(LAYERS, EngineConfig(block_size=8, max_num_seqs=3), 320, CPU)
    assert sized == 3 * 40  # three max-length requests of 40 blocks fit under the CPU cap
    with pytest.raises(ValueError, match="cannot hold one request"):
        num_kv_blocks(LAYERS, EngineConfig(block_size=8, num_kv_blocks=39), 320, CPU)


def test_caches_take_each_layers_shape_and_dtype():
    k, v = allocate_kv_caches(LAYERS, 5, 8, CPU)
    assert [tuple(t.shape) for t in k] == [(5, 8, 2, 16)] * 2
    assert [tuple(t.shape) for t in v] == [(5, 8, 2, 16), (5, 8, 2, 8)]
    assert [t.dtype for t in k] == [torch.float32, torch.bfloat16] and not any(t.any() for t in k + v)
