"""Property tests of Scheduler + KVCacheManager with a fake model (no tensors).

The fake "KV cache" is a list of slots holding the token id written there; the fake model writes
each scheduled token at its slot and then checks that every position the row attends to holds
the request's own token (prefix-cache hits and recomputes after preemption included). The next
token is a function of the request's tokens, so a wrong cache shows up as a wrong stream too.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xy_inductor import SamplingParams
from xy_inductor.engine.kv_cache import KVCacheManager
from xy_inductor.engine.request import Request
from xy_inductor.engine.scheduler import Scheduler

VOCAB = 7  # few token values: random prompts share prefixes, so the cache gets hits


def next_token(tokens: list[int]) -> int:
    return (sum(tokens[-3:]) * 31 + len(tokens)) % VOCAB


def expected_output(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def check_pool(kv: KVCacheManager, scheduler: Scheduler) -> None:
    pool = kv.pool
    holders = [0] * pool.num_blocks
    for request in scheduler.running:
        for block in kv.block_table(request.request_id):
            holders[block] += 1
    assert holders == pool.ref_counts, "ref counts must equal the number of tables holding each block"
    assert pool.num_free == sum(1 for c in pool.ref_counts if c == 0)
    for request in scheduler.waiting:
        assert not kv.block_table(request.request_id)


def run_fake(requests_spec, budget, max_num_seqs, block_size, num_blocks, prefix_caching):
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    scheduler = Scheduler(kv, budget, max_num_seqs)
    slots: list[int | None] = [None] * (num_blocks * block_size)
    pending = sorted(requests_spec, key=lambda r: r[0])  # (arrival step, prompt, max_tokens)
    all_requests, step = [], 0
    while pending or scheduler.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, max_tokens = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            request = Request(str(len(all_requests)), prompt, params, max_model_len=10_000)
            scheduler.add_request(request)
            all_requests.append(request)
        out = scheduler.schedule()
        assert out.num_tokens <= budget
        assert len({r.request_id for r in out.rows}) == len(out.rows)
        assert len(scheduler.running) <= max_num_seqs
        check_pool(kv, scheduler)
        sampled = {}
        for row in out.rows:
            request = scheduler.requests[row.request_id]
            for slot, token in zip(row.slot_mapping, row.token_ids):
                slots[slot] = token
            table = row.block_table
            for pos in range(row.seq_len):
                slot = table[pos // block_size] * block_size + pos % block_size
                assert slots[slot] == request.token_id(pos), "attended KV slot holds another token"
            if row.sample:
                sampled[row.request_id] = [next_token(request.token_ids(0, row.seq_len))]
        scheduler.update_from_output(out, sampled)
        check_pool(kv, scheduler)
        step += 1
        assert step < 5_000, "no progress"
    return kv, scheduler, all_requests


request_spec = st.tuples(
    st.integers(0, 30),  # arrival step
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=90),
    st.integers(1, 12),  # max_tokens
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(request_spec, min_size=1, max_size=12),
    budget=st.integers(4, 64),
    seqs=st.integers(1, 8),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
    spare_blocks=st.integers(0, 30),
    prefix_caching=st.booleans(),
)
def test_random_workloads_finish_within_budget_without_leaks(specs, budget, seqs, block_size, spare_blocks,
                                                             prefix_caching):
    seqs = min(seqs, budget)
    longest = max(len(p) + n for _, p, n in specs)
    num_blocks = -(-longest // block_size) + spare_blocks  # the pool can always hold the longest request
    kv, scheduler, requests = run_fake(specs, budget, seqs, block_size, num_blocks, prefix_caching)
    for request, (_, prompt, max_tokens) in zip(requests, specs_in_arrival_order(specs)):
        assert request.finished and request.status.value == "length"
        assert request.output_token_ids == expected_output(prompt, max_tokens)
    assert kv.pool.num_free == num_blocks and all(c == 0 for c in kv.pool.ref_counts)
    assert not scheduler.requests


def specs_in_arrival_order(specs):
    return sorted(specs, key=lambda r: r[0])


def test_tight_pool_forces_preemption_and_still_finishes():
    # 4 requests growing to 26 tokens (7 blocks each) in a pool of 16 blocks: decodes must preempt.
    specs = [(0, [i] * 6, 20) for i in range(4)]
    kv, scheduler, requests = run_fake(specs, budget=32, max_num_seqs=4, block_size=4, num_blocks=16,
                                       prefix_caching=True)
    assert scheduler.num_preemptions > 0
    assert all(r.output_token_ids == expected_output(r.prompt_token_ids, 20) for r in requests)
    assert kv.pool.num_free == 16


def test_shared_prompts_hit_the_prefix_cache():
    prompt = [1, 2, 3, 4] * 8  # 32 tokens = 4 full blocks of 8
    specs = [(0, prompt, 2), (5, prompt + [5], 2), (6, prompt, 2)]
    kv, _, requests = run_fake(specs, budget=64, max_num_seqs=4, block_size=8, num_blocks=32, prefix_caching=True)
    # later requests reuse every full block that leaves them a token to compute
    assert requests[1].metrics.num_cached_tokens == 32
    assert requests[2].metrics.num_cached_tokens == 24
    assert kv.num_hit_blocks == 7


def test_double_free_is_refused():
    import pytest

    kv = KVCacheManager(4, 2)
    request = Request("a", [1, 2, 3], SamplingParams())
    assert kv.allocate_slots(request, 3)
    table = list(kv.block_table("a"))
    kv.free(request)
    with pytest.raises(RuntimeError, match="double free"):
        kv.pool.free(table)
