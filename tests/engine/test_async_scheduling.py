"""Overlapped steps (async_scheduling): the host schedules step N+1 before it reads step N's
tokens, which the device feeds into N+1's inputs. Tokens, stops and KV bookkeeping must be exactly
those of in-order steps."""
from __future__ import annotations

import pytest
from engine_models import VOCAB, build_model, random_prompts, reference

from xy_inductor import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LENGTHS = [1, 7, 300, 33, 64, 2, 150, 17, 90, 5, 250, 40]


def _llm(family="llama", **engine):
    engine.setdefault("max_num_batched_tokens", 64)
    engine.setdefault("max_num_seqs", 12)
    return LLM(build_model(family), compile=False, **engine)


def _assert_no_leak(llm: LLM) -> None:
    pool = llm.engine.kv.pool
    assert pool.num_free == pool.num_blocks and all(c == 0 for c in pool.ref_counts)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_overlapped_greedy_equals_hf_in_a_chunked_mixed_batch(family):
    prompts = random_prompts(LENGTHS, seed=5)
    expected = reference(family, tuple(map(tuple, prompts)), GREEDY.max_tokens)
    llm = _llm(family, async_scheduling=True)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    stats = llm.stats
    assert stats["overlapped_steps"] == stats["steps"] > 0
    assert all(o.finish_reason == "length" for o in outs)
    _assert_no_leak(llm)


def test_default_is_in_order_on_cpu():
    llm = _llm()
    llm.generate(random_prompts([5, 9]), GREEDY, use_tqdm=False)
    assert llm.stats["overlapped_steps"] == 0 and llm.stats["steps"] > 0


def _stop_params(prompts, seed=0) -> list[SamplingParams]:
    """Stop tokens taken from each request's own greedy continuation, so requests stop early at
    different steps (some while their batch mates still prefill)."""
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    return [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[e[(i * 5) % 12]], ignore_eos=True)
            for i, e in enumerate(expected)]


def test_early_stops_match_in_order_steps_and_free_every_block():
    prompts = random_prompts(LENGTHS, seed=6)
    params = _stop_params(prompts)
    want = _llm(async_scheduling=False).generate(prompts, params, use_tqdm=False)
    llm = _llm(async_scheduling=True)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert any(len(o.token_ids) < 12 for o in got)  # the stops did cut some requests short
    _assert_no_leak(llm)
    # the engine stays usable after the wasted rows of stopped requests
    again = llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == reference("llama", tuple(map(tuple, prompts[:3])), 12)


def test_preemption_under_overlap_keeps_tokens_and_leaks_nothing():
    prompts = random_prompts([150, 90, 120, 60, 130, 40, 100, 75], seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = reference("qwen2", tuple(map(tuple, prompts)), params.max_tokens)
    llm = LLM(build_model("qwen2"), block_size=8, num_kv_blocks=40, max_model_len=320, max_num_batched_tokens=96,
              max_num_seqs=8, compile=False, async_scheduling=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert llm.stats["preemptions"] > 0 and llm.stats["overlapped_steps"] > 0
    _assert_no_leak(llm)


def test_seeded_sampling_matches_in_order_steps():
    prompts = random_prompts([3, 40, 100, 8], seed=9)
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=10, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    want = _llm(async_scheduling=False).generate(prompts, params, use_tqdm=False)
    got = _llm(async_scheduling=True).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_repetition_penalty_runs_in_order_and_is_exact():
    prompts = random_prompts([12, 30], seed=4)
    penalised = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3, ignore_eos=True)
    want = _llm(async_scheduling=False).generate(prompts, penalised, use_tqdm=False)
    llm = _llm(async_scheduling=True)
    got = llm.generate(prompts, penalised, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.stats["overlapped_steps"] == 0  # the penalty needs every token on the host


def test_switching_between_overlapped_and_in_order_steps():
    """A penalised request arriving while plain ones run overlapped: the step in flight is read
    first, then steps run in order; tokens equal HF for the plain ones."""
    prompts = random_prompts([20, 45, 9], seed=12)
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    llm = _llm(async_scheduling=True)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    outs: dict[str, list[int]] = {}
    for _ in range(4):
        for o in engine.step():
            outs[o.request_id] = o.token_ids
    assert engine.num_overlapped_steps == 4
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3, repetition_penalty=1.2), "pen")
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o.token_ids
    assert [outs[i] for i in ids] == expected
    assert len(outs["pen"]) == 3
    _assert_no_leak(llm)


def test_abort_while_a_step_is_in_flight():
    prompts = random_prompts([30, 60, 5], seed=13)
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    llm = _llm(async_scheduling=True)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    victim = engine.add_request(random_prompts([40], seed=14)[0], GREEDY)
    outs: dict[str, list[int]] = {}
    for step in range(30):
        if step == 3:
            engine.abort_request(victim)  # its row is in the step in flight
        for o in engine.step():
            outs[o.request_id] = o.token_ids
        if not engine.has_unfinished():
            break
    assert [outs[i] for i in ids] == expected
    assert len(outs.get(victim, [])) < GREEDY.max_tokens
    _assert_no_leak(llm)


def test_stream_and_max_model_len_under_overlap():
    prompts = random_prompts([10, 3], seed=15)
    llm = _llm(async_scheduling=True, max_model_len=16)
    seen: dict[str, list[int]] = {}
    for out in llm.stream(prompts, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)):
        seen.setdefault(out.request_id, []).extend(out.new_token_ids)
        if out.finished:
            assert seen[out.request_id] == out.token_ids and out.finish_reason == "length"
    assert sorted(len(t) for t in seen.values()) == [6, 13]  # stopped at max_model_len 16
    assert all(0 <= t < VOCAB for t in sum(seen.values(), []))
    _assert_no_leak(llm)


@pytest.mark.parametrize("overlap", [False, True])
def test_prompt_of_exactly_max_model_len_is_prefilled_in_chunks(overlap):
    prompt = random_prompts([64], seed=1)[0]
    llm = _llm(max_model_len=64, max_num_batched_tokens=48, async_scheduling=overlap)
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert out.token_ids == reference("llama", (tuple(prompt),), 1)[0]  # one token fits: 64 + 1 > 64 stops it
    assert out.finish_reason == "length"
    _assert_no_leak(llm)


def test_a_failed_wait_aborts_the_steps_requests_and_the_engine_goes_on(monkeypatch):
    """Ctrl-C while the host waits for the device: the two steps' requests end as aborted (never
    wrong tokens), and the engine serves new requests exactly."""
    from xy_inductor.engine import overlap

    prompts = random_prompts([9, 20], seed=2)
    llm = _llm(async_scheduling=True)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    wait, calls = overlap.InflightStep.wait, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return wait(self)

    monkeypatch.setattr(overlap.InflightStep, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(10):
            engine.step()
    assert not engine.has_unfinished() and all(i not in engine.scheduler.requests for i in ids)
    _assert_no_leak(llm)
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)


def test_a_failed_wait_before_in_order_steps_aborts_the_step_in_flight(monkeypatch):
    """The step in flight is read first when steps switch to in order; if that read fails, its
    requests end as aborted too (a PENDING token must never reach a forward)."""
    from xy_inductor.engine import overlap

    prompts = random_prompts([9, 20], seed=3)
    llm = _llm(async_scheduling=True)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(3):
        engine.step()
    monkeypatch.setattr(overlap.InflightStep, "wait", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3, repetition_penalty=1.2), "pen")
    with pytest.raises(KeyboardInterrupt):
        engine.step()  # in order now: reads the step in flight first
    monkeypatch.undo()
    assert all(i not in engine.scheduler.requests for i in ids)
    while engine.has_unfinished():
        engine.step()
    _assert_no_leak(llm)
