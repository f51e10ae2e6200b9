"""store_kv kernel vs the reference (Triton CPU interpreter)."""
import pytest
import torch

from ascend_kernels import kv_store, reference


@pytest.mark.parametrize("block_size,num_kv_heads,head_dim,dtype,cache_dtype", [
    (16, 2, 64, torch.float32, torch.float32),
    (32, 8, 80, torch.bfloat16, torch.bfloat16),
    (16, 1, 128, torch.float32, torch.float16),  # the store casts to the cache dtype
])
def test_store_kv_matches_reference(block_size, num_kv_heads, head_dim, dtype, cache_dtype):
    gen = torch.Generator().manual_seed(block_size + head_dim)
    num_blocks, tokens = 6, 13
    key = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(torch.int32)
    slots[[2, 7]] = -1  # padding rows of a virtually padded bucket
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype) for _ in range(2)]
    expect = [c.clone() for c in caches]
    kv_store.store_kv(key, value, caches[0], caches[1], slots)
    reference.store_kv(key, value, expect[0], expect[1], slots)
    assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])


def test_store_kv_strided_key_and_int64_slots():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 3, 2, 64, generator=gen)  # a fused projection viewed per part
    key, value = qkv[:, 1], qkv[:, 2]
    k_cache, v_cache = torch.zeros(2, 16, 2, 64), torch.zeros(2, 16, 2, 64)
    slots = torch.tensor([31, 0, -1, 17, 5])
    kv_store.store_kv(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], key[t]) and torch.equal(flat_v[slot], value[t])
    assert flat_k.abs().sum(dim=(1, 2)).nonzero().numel() == 4
