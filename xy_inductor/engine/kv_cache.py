"""KVCacheManager: per-request block tables over a BlockPool, with automatic prefix caching.

A request's logical block i holds its tokens [i * block_size, (i + 1) * block_size). A full block
is identified by a hash of its token ids chained with the hash of the block before it, so equal
hashes mean equal prefixes. Blocks are registered in the cache only after the step that computed
them ran, so a cache hit never points at KV that is not written yet.
Only whole blocks are shared (no copy-on-write of a partly matching block).
"""
from __future__ import annotations

import hashlib
from array import array

from xy_inductor.engine.block_pool import BlockPool
from xy_inductor.engine.request import Request


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of a request's full blocks, by tokens only
        self._num_registered: dict[str, int] = {}  # how many leading blocks are in the cache index
        self.num_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of which served by cached blocks
        self.num_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block(parent, request.token_ids(i * bs, (i + 1) * bs)))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks matching the request's leading full blocks (always leaves one token to compute)."""
        if not self.enable_prefix_caching or request.num_computed_tokens > 0:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in self._block_hashes(request, max_blocks):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give the request room for `num_new_tokens` more tokens after its computed ones (plus any
        prefix-cache hits it takes now). False, with nothing changed, when the pool is too small."""
        num_cached = len(cached_blocks)
        needed = self._blocks_needed(request, num_cached * self.block_size + num_new_tokens) - num_cached
        # Hits on free blocks leave the free list when taken, so they cannot also be handed out.
        free_hits = sum(1 for b in cached_blocks if self.pool.is_free(b))
        if needed > self.pool.num_free - free_hits:
            return False
        self.pool.touch(list(cached_blocks))
        table = self._tables.setdefault(request.request_id, [])
        table.extend(cached_blocks)
        if num_cached:
            self._num_registered[request.request_id] = len(table)
        if needed > 0:
            table.extend(self.pool.allocate(needed))
        return True

    def _blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so the request holds its computed tokens plus `num_new_tokens`."""
        total = request.num_computed_tokens + num_new_tokens
        return self.num_blocks_for(total) - len(self._tables.get(request.request_id, []))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Whether `allocate_slots(request, num_new_tokens)` would succeed without preempting."""
        return self._blocks_needed(request, num_new_tokens) <= self.pool.num_free

    def truncate(self, request: Request) -> None:
        """Free the blocks past the request's computed tokens (rejected drafts' KV). Such blocks
        were never registered in the prefix cache: only blocks full of computed tokens are."""
        table = self._tables.get(request.request_id)
        if not table:
            return
        keep = max(self.num_blocks_for(request.num_computed_tokens), self._num_registered.get(request.request_id, 0))
        if len(table) > keep:
            self.pool.free(table[keep:][::-1])
            del table[keep:]

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_prompt_tokens
        self.num_hit_tokens += num_hit_tokens
        self.num_hit_blocks += num_hit_tokens // self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that its computed tokens have filled (call after the step ran).
        Tokens still PENDING (a decode burst's, overlap.py) wait: a block's hash needs its token ids."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = min(request.num_computed_tokens, request.num_known_tokens) // self.block_size
        start = self._num_registered.get(rid, 0)
        if num_full <= start:
            return
        table = self._tables[rid]
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache(table[i], hashes[i])
        self._num_registered[rid] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks (it keeps its token hashes, in case it comes back)."""
        table = self._tables.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if table:
            self.pool.free(table[::-1])

    def remove(self, request: Request) -> None:
        self.free(request)
        self._hashes.pop(request.request_id, None)
