"""Prefix caching and preemption keep the tokens exact and leak no KV block."""
from __future__ import annotations

from engine_models import build_model, random_prompts, reference

from xy_inductor import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_shared_prefix_reuses_blocks_and_keeps_tokens():
    prefix = random_prompts([200], seed=7)[0]
    tails = random_prompts([1, 9, 30, 16, 45], seed=8)
    prompts = [prefix + t for t in tails]
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    llm = LLM(build_model("llama"), block_size=16, max_num_batched_tokens=64, max_num_seqs=8, compile=False)

    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert first[0].token_ids == expected[0]
    assert llm.stats["prefix_hit_tokens"] == 0
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)

    assert [o.token_ids for o in rest] == expected[1:]
    full_prefix_blocks = len(prefix) // 16  # 12 blocks of the 200-token prefix are full
    assert llm.stats["prefix_hit_blocks"] >= full_prefix_blocks * len(rest)
    assert all(o.metrics.num_cached_tokens >= full_prefix_blocks * 16 for o in rest)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_prefix_caching_off_gives_same_tokens_without_hits():
    prefix = random_prompts([100], seed=7)[0]
    prompts = [prefix + t for t in random_prompts([3, 20], seed=9)]
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    llm = LLM(build_model("llama"), enable_prefix_caching=False, max_num_batched_tokens=64, compile=False)
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert llm.stats["prefix_hit_tokens"] == 0


def test_small_kv_pool_preempts_recomputes_and_finishes():
    lengths = [150, 90, 120, 60, 130, 40, 100, 75]
    prompts = random_prompts(lengths, seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = reference("qwen2", tuple(map(tuple, prompts)), params.max_tokens)
    # 40 blocks x 8 tokens = 320 slots for 765 prompt tokens + 192 new ones: must preempt.
    llm = LLM(build_model("qwen2"), block_size=8, num_kv_blocks=40, max_model_len=320,
              max_num_batched_tokens=96, max_num_seqs=8, compile=False)
    outs = llm.generate(prompts, params, use_tqdm=False)

    assert [o.token_ids for o in outs] == expected
    assert llm.stats["preemptions"] > 0
    assert sum(o.metrics.num_preemptions for o in outs) == llm.stats["preemptions"]
    pool = llm.engine.kv.pool
    assert pool.num_free == pool.num_blocks and all(c == 0 for c in pool.ref_counts)
