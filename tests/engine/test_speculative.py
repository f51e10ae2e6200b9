"""Speculative decoding inside the mixed batch: verify rows share steps with prefill chunks and
decodes, greedy outputs equal plain greedy token for token, rejected drafts leak no KV."""
from __future__ import annotations

import pytest
from engine_models import build_model, random_prompts, reference

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


def test_draft_model_runs_batched_in_its_own_paged_runner():
    """All decoding requests draft together: k batched draft forwards per engine step (more only when
    a catch-up exceeds the token budget); the draft's KV blocks all come back."""
    from xy_inductor.engine.paged_drafter import PagedDraftDrafter

    model, k = build_model("llama"), 3
    prompts = _prompts()[:8]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    want, _, _ = _run(model, prompts, params)
    llm = LLM(model, max_num_batched_tokens=512, max_num_seqs=12, compile=False,
              speculative={"method": "draft_model", "draft_model": build_model("llama", seed=7),
                           "num_speculative_tokens": k})
    drafter = llm.engine.drafter
    assert isinstance(drafter, PagedDraftDrafter)
    rows_per_call = []
    execute = drafter.runner.execute

    def recorded(out):
        rows_per_call.append(len(out.rows))
        return execute(out)

    drafter.runner.execute = recorded
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert len(rows_per_call) <= k * llm.stats["steps"]
    assert max(rows_per_call) > 1  # several requests in one draft forward
    assert drafter.pool.num_free == drafter.runner.num_blocks and not drafter._kv


def test_draft_model_the_paged_kernels_cannot_serve_falls_back_visibly(caplog):
    """A draft without transformers' AttentionInterface drafts through HF's cache: same tokens."""
    from engine_models import VOCAB
    from transformers import BloomConfig, BloomForCausalLM

    model = build_model("llama")
    prompts = _prompts()[:4]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    want, _, _ = _run(model, prompts, params)
    draft = BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()
    with caplog.at_level("WARNING", logger="xyserve"):
        got, _, stats = _run(model, prompts, params,
                              speculative={"method": "draft_model", "draft_model": draft, "num_speculative_tokens": 3})
    assert "through HF's cache" in caplog.text
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert stats["spec_draft_tokens"] > 0


def test_aborted_request_gives_its_draft_kv_back():
    model = build_model("llama")
    llm = LLM(model, max_num_batched_tokens=64, compile=False,
              speculative={"method": "draft_model", "draft_model": build_model("llama", seed=7),
                           "num_speculative_tokens": 3})
    engine, drafter = llm.engine, llm.engine.drafter
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in _prompts()[:3]]
    for _ in range(4):
        engine.step()
    assert ids[0] in drafter._kv  # the short prompt is decoding: it has draft KV
    engine.abort_request(ids[0])
    while engine.has_unfinished():
        engine.step()
    assert drafter.pool.num_free == drafter.runner.num_blocks and not drafter._kv


def test_paged_drafts_are_the_draft_models_greedy_continuations():
    """Drafts equal HF greedy generate of the draft model, also after a rejection rewrote the tail
    (its KV is overwritten in place) and across a catch-up longer than the token budget."""
    import torch

    from xy_inductor.config import EngineConfig
    from xy_inductor.engine.paged_drafter import PagedDraftDrafter

    draft, k = build_model("llama", seed=7), 4

    def hf_greedy(tokens):
        out = draft.generate(torch.tensor([tokens]), max_new_tokens=k, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        return out[0, len(tokens):].tolist()

    prompts = _prompts()
    a, b = prompts[1][:150], prompts[2]
    expected = {"a": hf_greedy(a), "b": hf_greedy(b)}  # before the drafter switches the attention
    a2 = a + expected["a"][:2] + [(expected["a"][2] + 1) % 100]  # 2 accepted, then a different token
    expected["a2"] = hf_greedy(a2)
    drafter = PagedDraftDrafter(draft, k, EngineConfig(compile=False, block_size=16), max_model_len=256, budget=64)
    got = drafter.propose_batch([("a", a, k), ("b", b, k)])  # a's 150-token catch-up spans 3 steps
    assert got == {"a": expected["a"], "b": expected["b"]}
    assert drafter.propose_batch([("a", a2, k)]) == {"a": expected["a2"]}
    assert drafter.propose_batch([("b", b, 2)]) == {"b": expected["b"][:2]}  # max_tokens caps k
    for rid in ("a", "b"):
        drafter.release(rid)
    assert drafter.pool.num_free == drafter.runner.num_blocks


def test_stop_string_cuts_accepted_drafts_like_plain_decoding():
    """A verify step appends several tokens at once; those after a stop string are not output."""
    from engine_models import word_tokenizer

    tok = word_tokenizer()
    prompts = random_prompts([40, 12, 25], seed=8)
    ref = reference("llama", tuple(map(tuple, prompts)), 30)
    draft = build_model("llama")  # the target's own weights: every draft is accepted
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[f"w{ref[i][6]}"])
        plain = LLM(build_model("llama"), tok, compile=False).generate([p], params, use_tqdm=False)[0]
        spec = {"method": "draft_model", "draft_model": draft, "num_speculative_tokens": 3}
        got = LLM(build_model("llama"), tok, compile=False, speculative=spec).generate([p], params, use_tqdm=False)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
        assert plain.finish_reason == "stop" and len(plain.token_ids) <= 7


def test_greedy_rows_use_the_step_argmax_of_the_runner(monkeypatch):
    """Where the runner computed every logits row's argmax in the step (the GPU's row_argmax), plain
    and verify rows read it, taken to the host once a step, and the tokens stay those of plain greedy."""
    from xy_inductor.engine import sampler
    from xy_inductor.engine.sampler import argmax_rows

    model = build_model("llama")
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    want, _, _ = _run(model, prompts, params)
    llm = LLM(model, max_num_batched_tokens=64, max_num_seqs=12, compile=False,
              speculative={"method": "ngram", "num_speculative_tokens": 3})
    runner, execute, steps = llm.engine.runner, llm.engine.runner.execute, []

    def with_argmax(out, feed=None):
        logits, ids = execute(out, feed)
        runner.last_argmax = argmax_rows(logits)  # what a GPU step leaves
        steps.append(len(ids))
        return logits, ids

    def refused(_logits):
        raise AssertionError("the engine recomputed an argmax the step had")

    runner.execute = with_argmax
    monkeypatch.setattr(sampler, "argmax_rows", refused)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.stats["spec_draft_tokens"] > 0 and steps
