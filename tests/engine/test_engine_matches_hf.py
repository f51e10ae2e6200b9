"""The engine's greedy tokens equal HF generate's, prompt by prompt, for mixed chunked batches."""
from __future__ import annotations

import pytest
from engine_models import FAMILIES, build_model, random_prompts, reference

from xy_inductor import LLM, SamplingParams
from xy_inductor.engine.outputs import Stage

LENGTHS = [1, 300, 7, 64, 129, 2, 250, 33, 16, 17, 180, 90, 5]
NEW_TOKENS = 6


def record_steps(llm: LLM) -> list:
    """Wrap the runner so each step's Token-Table is kept for inspection."""
    steps = []
    runner = llm.engine.runner
    execute = runner.execute

    def wrapped(out, feed=None):
        steps.append([(r.stage, r.num_computed_tokens, r.num_new_tokens, r.sample) for r in out.rows])
        return execute(out, feed)

    runner.execute = wrapped
    return steps


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_hf_generate(family):
    prompts = random_prompts(LENGTHS)
    expected = reference(family, tuple(map(tuple, prompts)), NEW_TOKENS)
    budget = 48
    llm = LLM(build_model(family), max_num_batched_tokens=budget, max_num_seqs=16, compile=False)
    steps = record_steps(llm)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)

    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" and o.finished for o in outs)
    assert all(sum(n for _, _, n, _ in rows) <= budget for rows in steps)
    # The schedule really mixed stages: chunked prompts and decodes shared steps.
    assert any({s for s, *_ in rows} == {Stage.PREFILL, Stage.DECODE} for rows in steps)
    assert any(s is Stage.PREFILL and done > 0 for rows in steps for s, done, _, _ in rows)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_metrics_and_order():
    prompts = random_prompts([3, 40, 11])
    llm = LLM(build_model("llama"), max_num_batched_tokens=32, max_num_seqs=4, compile=False)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        assert o.time_to_first_token is not None and o.time_to_first_token > 0
        assert len(o.time_between_tokens) == 3 and all(t >= 0 for t in o.time_between_tokens)


def test_stream_yields_every_token_once():
    prompts = random_prompts([5, 60])
    llm = LLM(build_model("llama"), max_num_batched_tokens=32, max_num_seqs=4, compile=False)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    seen: dict[str, list[int]] = {}
    finished = set()
    for out in llm.stream(prompts, params):
        seen.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert seen[out.request_id] == out.token_ids
        if out.finished:
            finished.add(out.request_id)
    assert len(finished) == 2
    expected = reference("llama", tuple(map(tuple, prompts)), 5)
    assert sorted(seen.values()) == sorted(expected)
