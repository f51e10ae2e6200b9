"""BlockPool: the physical KV blocks, their reference counts and the prefix-cache index.

A block is free when no request holds it (ref count 0). A free block may still hold the KV of a
full, hashed block: it stays findable by its hash until it is handed out again, so a later request
with the same prefix reuses it. Free blocks are handed out least recently freed first; blocks that
hold nothing reusable are handed out before cached ones.
"""
from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"xyserve: the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        # Insertion order = eviction order: the front is handed out first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref count 1), evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise RuntimeError(f"xyserve: asked for {n} KV blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Share cached blocks with one more request (prefix-cache hits)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; pass a request's blocks tail first, so its tail is evicted first."""
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"xyserve: double free of KV block {block_id}")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self.block_hashes[block_id] is None:
                    self._free.move_to_end(block_id, last=False)  # nothing to reuse: hand it out first

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Make a full block findable by its hash (a duplicate of an already cached block stays private)."""
        if not self.enable_caching or self.block_hashes[block_id] is not None:
            return
        if block_hash in self._cached:
            return
        self._cached[block_hash] = block_id
        self.block_hashes[block_id] = block_hash

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            self.num_evictions += 1
            del self._cached[block_hash]
            self.block_hashes[block_id] = None
