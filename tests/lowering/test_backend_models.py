"""torch.compile(backend="xyserve") on six HF decoder families: same logits and tokens as eager.

Every case compiles through Inductor on the CPU (the reference kernels run behind the ops),
generates greedily (16 new tokens, a batch of 2 with left padding) and asserts that every linear
and every attention of the model was lowered.
"""
from __future__ import annotations

import pytest
import torch

from tiny_decoders import LINEARS_PER_LAYER, build, left_padded_batch
from xy_inductor import backend

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "phi3", "gemma"]


def _generate(model, ids, mask, cache):
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=16, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **extra,
        )


def _assert_fully_lowered(name: str, model) -> None:
    layers = model.config.num_hidden_layers
    linears = LINEARS_PER_LAYER[name] * layers + 1
    reports = [r for r in backend.reports() if r.rewrites]
    assert reports, "the backend lowered nothing"
    for r in reports:
        assert r.count("linear", "addmm") == linears, r.counters
        assert r.count("sdpa", "eager_attention") == layers, r.counters
        assert not [s for s in r.skipped if s.what == "attention"], r.skipped


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_generate_matches_eager(name, attn, cache):
    torch._dynamo.reset()
    backend.reset_reports()
    model = build(name, attn)
    ids, mask = left_padded_batch()
    ref = _generate(model, ids, mask, cache)
    model.forward = torch.compile(model.forward, backend="xyserve")
    out = _generate(model, ids, mask, cache)

    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits, strict=True):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel <= 1e-5, rel
    _assert_fully_lowered(name, model)
