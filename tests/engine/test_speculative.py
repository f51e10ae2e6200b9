"""Speculative decoding inside the mixed batch: verify rows share steps with prefill chunks and
decodes, greedy outputs equal plain greedy token for token, rejected drafts leak no KV."""
from __future__ import annotations

import pytest
from engine_models import build_model, random_prompts

from xy_inductor import LLM, SamplingParams
from xy_inductor.engine.outputs import Stage

LENGTHS = [5, 200, 12, 90, 3, 150, 40, 64, 8, 120, 33, 70]
NEW = 12


def _prompts():
    prompts = random_prompts(LENGTHS)
    # repeating patterns give the n-gram drafter something to find
    return [p[:6] * (len(p) // 6) + p[: len(p) % 6] if i % 2 else p for i, p in enumerate(prompts)]


def _run(model, prompts, params, **engine):
    llm = LLM(model, max_num_batched_tokens=64, max_num_seqs=12, compile=False, **engine)
    stages = []
    execute = llm.engine.runner.execute

    def recorded(out):
        stages.append({r.stage for r in out.rows})
        return execute(out)

    llm.engine.runner.execute = recorded
    outs = llm.generate(prompts, params, use_tqdm=False)
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.pool.num_blocks  # nothing leaked, rejected drafts included
    return outs, stages, llm.stats


@pytest.mark.parametrize("method", ["ngram", "draft_model_self", "draft_model_other"])
def test_speculative_greedy_equals_plain_greedy_in_a_mixed_batch(method):
    model = build_model("llama")
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    want, _, _ = _run(model, prompts, params)
    if method == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": 3}
    else:
        draft = model if method == "draft_model_self" else build_model("llama", seed=7)
        spec = {"method": "draft_model", "draft_model": draft, "num_speculative_tokens": 3}
    got, stages, stats = _run(model, prompts, params, speculative=spec)

    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert any({Stage.VERIFY, Stage.PREFILL} <= s for s in stages), "verify never shared a step with a prefill"
    assert stats["spec_draft_tokens"] > 0
    rates = [o.metrics.acceptance_rate for o in got if o.metrics.num_draft_tokens]
    print(method, "acceptance", stats["spec_acceptance_rate"], "steps", stats["steps"])
    if method == "draft_model_self":
        assert stats["spec_acceptance_rate"] == 1.0 and all(r == 1.0 for r in rates)
    else:
        assert stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # some rejections were rolled back


def test_speculative_sampling_runs_and_respects_lengths():
    model = build_model("llama")
    prompts = _prompts()[:6]
    params = SamplingParams(temperature=0.9, top_k=50, max_tokens=NEW, ignore_eos=True, seed=3)
    spec = {"method": "draft_model", "draft_model": build_model("llama", seed=7), "num_speculative_tokens": 4}
    outs, _, stats = _run(model, prompts, params, speculative=spec)
    assert all(len(o.token_ids) == NEW for o in outs)
    assert stats["spec_draft_tokens"] > 0
