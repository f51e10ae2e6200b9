"""`accelerate(model)`: HF generate through the engine returns HF's own tokens, or falls back visibly."""
from __future__ import annotations

import pytest
import torch
from engine_models import VOCAB, build_model, random_prompts

import xy_inductor


def _left_padded(lengths):
    prompts = random_prompts(lengths, seed=5)
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _hf(model, *args, **kwargs):
    with torch.inference_mode():
        return model.generate(*args, **kwargs)


@pytest.mark.parametrize("extra", [{}, {"prompt_lookup_num_tokens": 3}, {"assistant": True}])
def test_greedy_generate_equals_hf(extra):
    model = build_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = _left_padded([9, 30, 4])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = _hf(model, ids, **kwargs)  # speculative greedy == plain greedy; HF drafts only at batch 1
    if extra.get("assistant"):
        extra = {"assistant_model": build_model("llama", seed=3)}
    with xy_inductor.accelerate(model, compile=False, max_num_batched_tokens=64):
        got = model.generate(ids, **kwargs, **extra)
    assert torch.equal(got, want)
    assert "generate" not in vars(model)  # restored on exit


@pytest.mark.parametrize("overlap", [False, True])
def test_eos_stops_and_pads_like_hf(overlap):
    model = build_model("llama")
    ids, mask = _left_padded([12, 5])
    free = _hf(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 2])  # a token the first row emits third: it must stop there
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=7, eos_token_id=eos)
    want = _hf(model, ids, **kwargs)
    xy_inductor.accelerate(model, compile=False, async_scheduling=overlap)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("overlap", [False, True])
def test_streamer_sees_the_same_tokens(overlap):
    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    model = build_model("llama")
    model.generation_config.eos_token_id = None
    ids = torch.tensor([random_prompts([6])[0]])
    hf_stream, our_stream = Collect(), Collect()
    want = _hf(model, ids, max_new_tokens=5, do_sample=False, streamer=hf_stream, pad_token_id=0)
    with xy_inductor.accelerate(model, compile=False, async_scheduling=overlap):
        got = model.generate(ids, max_new_tokens=5, do_sample=False, streamer=our_stream, pad_token_id=0)
    assert torch.equal(got, want) and our_stream.chunks == hf_stream.chunks


def test_sampling_runs_through_the_engine():
    model = build_model("llama")
    ids, mask = _left_padded([8, 3])
    with xy_inductor.accelerate(model, compile=False) as m:
        out = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20,
                         pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, ids.shape[1] + 6) and int(out.max()) < VOCAB


def test_unsupported_argument_falls_back_visibly_and_exactly():
    model = build_model("llama")
    ids, mask = _left_padded([7, 7])
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)
    want = _hf(model, ids, **kwargs)
    with xy_inductor.accelerate(model, compile=False):
        with pytest.warns(UserWarning, match="falls back to Hugging Face.*num_beams"):
            got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
