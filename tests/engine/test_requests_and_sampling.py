"""Bad input is refused clearly without disturbing other requests; sampling options and stops."""
from __future__ import annotations

import pytest
import torch
from engine_models import VOCAB, build_model, random_prompts, reference, word_tokenizer
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from xy_inductor import LLM, EngineConfig, SamplingParams
from xy_inductor.engine.sampler import apply_repetition_penalty, argmax_rows, filter_top_k_top_p

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(build_model("llama"), tokenizer=word_tokenizer(), max_num_batched_tokens=32, max_model_len=256,
               compile=False)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([], "empty prompt"),
        ("", "empty prompt"),
        ([1] * 257, "exceeds max_model_len"),
        ([1, VOCAB], "not in the vocabulary"),
        ([1, -1], "not in the vocabulary"),
        ([1, 2.5], "not in the vocabulary"),
    ],
)
def test_bad_prompt_is_refused_and_others_finish(llm, prompt, match):
    good = random_prompts([10, 20], seed=4)
    stream = llm.stream(good, GREEDY)
    first = next(stream)  # the good requests are in flight
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request(prompt, GREEDY)
    with pytest.raises(ValueError, match=match):
        llm.generate([good[0], prompt], GREEDY, use_tqdm=False)  # refused as a whole, nothing added
    outs = [first] + list(stream)
    finished = {o.request_id: o.token_ids for o in outs if o.finished}
    assert sorted(finished.values()) == sorted(reference("llama", tuple(map(tuple, good)), 4))
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_invalid_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_options_and_bad_engine_config():
    with pytest.raises(TypeError, match="top_q"):
        SamplingParams(top_q=0.5)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=4, max_num_seqs=8)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="a tokenizer"):
        LLM(build_model("llama"), compile=False).generate("text prompt", GREEDY, use_tqdm=False)


def test_eos_stop_token_and_stop_string(llm):
    prompt = random_prompts([12], seed=5)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    tokens = free.token_ids
    assert free.text == " ".join(f"w{t}" for t in tokens)
    # stop token id: finish right after the 3rd token
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[tokens[2]]),
                       use_tqdm=False)[0]
    assert out.token_ids == tokens[: tokens.index(tokens[2]) + 1] and out.finish_reason == "stop"
    # stop string: the text is cut before it, the request stops as soon as it shows up
    stop = f"w{tokens[4]}"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop=stop), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert out.text == free.text[: free.text.index(stop)]
    # EOS from the tokenizer / generation config: make the model's first pick the EOS id
    engine = llm.engine
    saved = engine.eos_token_ids
    try:
        engine.eos_token_ids = (tokens[0],)  # copied into each new request
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
        assert out.token_ids == tokens[:1] and out.finish_reason == "stop"
    finally:
        engine.eos_token_ids = saved


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    prompts = random_prompts([8, 30, 3], seed=6)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, max_tokens=6, seed=123, ignore_eos=True)
    alone = llm.generate(prompts[0], params, use_tqdm=False)[0].token_ids
    batched = llm.generate(prompts, [params, SamplingParams(temperature=1.0, max_tokens=6), params],
                           use_tqdm=False)
    assert batched[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, max_tokens=6, seed=124, ignore_eos=True)
    assert llm.generate(prompts[0], other_seed, use_tqdm=False)[0].token_ids != alone


def test_filters_and_penalty_match_hf():
    torch.manual_seed(0)
    logits = torch.randn(1, 100) * 3
    seen = [3, 7, 7, 50, 99]
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits[0], seen, 1.3), hf[0])
    for k, p in [(5, 1.0), (0, 0.8), (10, 0.5), (1, 1.0)]:
        ours = filter_top_k_top_p(logits[0], k, p)
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref[0])), (k, p)


@pytest.mark.parametrize("vocab", [128256, 50257, 9001])  # a divisor near 2k; prime-ish; a ragged tail
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_argmax_equals_torch_argmax(vocab, dtype):
    """The accelerator form (chunks first) returns torch.argmax's first maximal index: ties, NaN, -inf."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(-3, 4, (6, vocab), generator=g).to(dtype)  # many ties per row
    x[1, vocab // 3] = x[1, vocab // 2] = float("nan")
    x[2] = float("-inf")
    x[3, -1] = 100  # the maximum in the last position (the tail chunk when there is one)
    x[4, 0] = 100
    assert torch.equal(argmax_rows(x, chunked=True), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))  # the default on the CPU: one pass


@pytest.mark.gpu
def test_chunked_argmax_on_gpu():
    """On a GPU argmax_rows takes the chunked form by default: equal to torch.argmax, ties included."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randint(-2, 3, (16, 128256), generator=g, device="cuda").to(dtype)
        x[5, 77] = float("nan")
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
        y = torch.randn(3, 128256, generator=g, device="cuda").to(dtype)
        assert torch.equal(argmax_rows(y), y.argmax(dim=-1))


def test_top_k_one_and_penalty_run_end_to_end(llm):
    prompt = random_prompts([20], seed=11)[0]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    top1 = llm.generate(prompt, SamplingParams(temperature=1.0, top_k=1, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)[0]
    assert top1.token_ids == greedy.token_ids
    model = build_model("llama")
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, repetition_penalty=1.5,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.5, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.token_ids == expected


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_hands_out_new_text_that_adds_up(overlap):
    """Each streamed output carries the text new since the last one; together they are the text."""
    stream_llm = LLM(build_model("llama"), tokenizer=word_tokenizer(), max_num_batched_tokens=32,
                     max_model_len=256, compile=False, async_scheduling=overlap)
    prompts = ["w1 w2 w3", "w9 w8"]
    pieces: dict[str, list[str]] = {}
    final = {}
    for out in stream_llm.stream(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)):
        assert out.new_text is not None
        pieces.setdefault(out.request_id, []).append(out.new_text)
        if out.finished:
            final[out.request_id] = out.text
    assert len(final) == 2
    for rid, text in final.items():
        assert "".join(pieces[rid]) == text and len(text.split()) == 6
