"""PagedDraftDrafter: the draft model run by the engine's own ModelRunner, all requests at once.

Per engine step it drafts k tokens for every decoding request in k batched forwards of the draft
model (paged KV cache of its own, compiled and CUDA-graphed like the target), instead of k
forwards per request through HF's cache:

    round 0:  each request catches its draft KV up to its tokens  (rows of 1+ tokens, one step
              or a few under the token budget)  -> greedy draft 1 per request
    round j:  one row of 1 token per request (draft j)            -> greedy draft j + 1

The draft KV of a request holds its tokens up to the last draft it was fed; after the target's
verdict the rejected tail is dropped by comparing with the request's new tokens (the positions
past the common prefix are simply recomputed: a paged cache overwrites in place).

A greedy draft is a point-mass proposal, which the verifier's rejection sampling handles exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from xy_inductor.config import EngineConfig
from xy_inductor.engine.block_pool import BlockPool
from xy_inductor.engine.model_runner import ModelRunner
from xy_inductor.engine.outputs import ScheduledRequest, SchedulerOutput, Stage
from xy_inductor.engine.sampler import step_argmax


@dataclass(slots=True)
class _DraftKV:
    """What the draft cache holds for one request."""

    token_ids: list[int] = field(default_factory=list)  # tokens whose draft KV is written
    block_table: list[int] = field(default_factory=list)


class PagedDraftDrafter:
    def __init__(self, model: torch.nn.Module, num_speculative_tokens: int, config: EngineConfig,
                 max_model_len: int, budget: int) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"xyserve: num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.num_speculative_tokens = num_speculative_tokens
        draft_config = dataclasses.replace(config, speculative=None, enable_prefix_caching=False,
                                           max_model_len=max_model_len, max_num_batched_tokens=budget)
        self.runner = ModelRunner(model, draft_config)
        self.block_size = draft_config.block_size
        self.budget = budget
        self.pool = BlockPool(self.runner.num_blocks, enable_caching=False)
        self._kv: dict[str, _DraftKV] = {}

    # ------------------------------------------------------------ bookkeeping
    def release(self, request_id: str) -> None:
        kv = self._kv.pop(request_id, None)
        if kv is not None and kv.block_table:
            self.pool.free(kv.block_table[::-1])

    def _reserve(self, kv: _DraftKV, num_tokens: int) -> bool:
        """Blocks for `num_tokens` positions; False (nothing changed) when the pool is short."""
        needed = -(-num_tokens // self.block_size) - len(kv.block_table)
        if needed > self.pool.num_free:
            return False
        if needed > 0:
            kv.block_table.extend(self.pool.allocate(needed))
        return True

    def _row(self, rid: str, kv: _DraftKV, tokens: list[int], start: int, sample: bool) -> ScheduledRequest:
        bs, table = self.block_size, kv.block_table
        slots = [table[p // bs] * bs + p % bs for p in range(start, start + len(tokens))]
        stage = Stage.DECODE if len(tokens) == 1 and start > 0 else Stage.PREFILL
        return ScheduledRequest(rid, stage, tokens, start, list(table), slots, sample)

    # ------------------------------------------------------------ drafting
    def propose_batch(self, items: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        """Up to min(k, max_tokens) greedy drafts per (request id, token ids, max_tokens)."""
        pending: dict[str, tuple[list[int], int]] = {}  # rid -> (tokens to feed from, drafts wanted)
        for rid, token_ids, max_tokens in items:
            k = min(self.num_speculative_tokens, max_tokens)
            kv = self._kv.setdefault(rid, _DraftKV())
            common, limit = 0, min(len(kv.token_ids), len(token_ids) - 1)  # feed >= 1 token
            while common < limit and kv.token_ids[common] == token_ids[common]:
                common += 1
            kv.token_ids = token_ids[:common]
            if k > 0 and self._reserve(kv, len(token_ids) + k - 1):
                pending[rid] = (token_ids, k)
        drafts: dict[str, list[int]] = {rid: [] for rid in pending}
        feed = {rid: token_ids[len(self._kv[rid].token_ids):] for rid, (token_ids, _) in pending.items()}
        for round_ in range(self.num_speculative_tokens):
            live = [rid for rid, (_, k) in pending.items() if k > round_]
            if not live:
                break
            for rid, token in self._forward({rid: feed[rid] for rid in live}).items():
                drafts[rid].append(token)
                feed[rid] = [token]
        return drafts  # each request's draft KV now holds its tokens + all drafts but the last

    @torch.inference_mode()
    def _forward(self, feed: dict[str, list[int]]) -> dict[str, int]:
        """Write the draft KV of every request's `feed` tokens; greedy next token of each. Rows are
        cut into steps of at most `budget` tokens (a long catch-up spans several steps)."""
        done: dict[str, int] = {}
        left = {rid: list(tokens) for rid, tokens in feed.items()}
        while left:
            rows, room = [], self.budget
            for rid in list(left):
                if room == 0:
                    break
                kv, take = self._kv[rid], left[rid][:room]
                last = len(take) == len(left[rid])
                rows.append(self._row(rid, kv, take, len(kv.token_ids), sample=last))
                kv.token_ids = kv.token_ids + take
                room -= len(take)
                if last:
                    del left[rid]
                else:
                    left[rid] = left[rid][len(take):]
            logits, sample_ids = self.runner.execute(SchedulerOutput(rows=rows))
            done.update(zip(sample_ids, step_argmax(logits, self.runner.last_argmax).tolist()))
        return done
