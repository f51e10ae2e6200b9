"""On a GPU, the backend runs HF models through the Triton kernels and stays exact ("auto": GEMMs of
shapes no table covers run cuBLAS; "triton": every GEMM runs a SmoothGEMM primitive)."""
from __future__ import annotations

import pytest
import torch

from tiny_decoders import build, left_padded_batch
from xy_inductor import backend

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("impl", ["auto", "triton"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
def test_triton_kernels_behind_the_backend_match_eager(name, attn, impl):
    torch._dynamo.reset()
    backend.reset_reports()
    model = build(name, attn).cuda()
    ids, mask = (t.cuda() for t in left_padded_batch(length=24))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
        model.forward = torch.compile(model.forward, backend="xyserve", options={"impl": impl, "lower_gemm": True,
                                                                                      "lower_attention": True})
        got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    rel = max(((g - w).norm() / w.norm()).item() for g, w in zip(got.logits, want.logits))
    assert rel <= 1e-4, rel
    assert all(r.count("sdpa", "eager_attention") == 2 for r in backend.reports() if r.rewrites)
    assert any(r.count("linear", "addmm") for r in backend.reports())


def test_default_lowers_only_under_cuda_graphs_and_stays_exact():
    """lower_attention / lower_gemm None on CUDA: attention and linears are lowered only where
    Inductor replays CUDA graphs; either way the logits match eager."""
    model = build("llama", "sdpa").cuda()
    ids, mask = (t.cuda() for t in left_padded_batch(length=24))
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    for mode, lowered in ((None, False), ("reduce-overhead", True)):
        torch._dynamo.reset()
        backend.reset_reports()
        with torch.no_grad():
            got = torch.compile(model, backend="xyserve", mode=mode)(ids, attention_mask=mask).logits
        assert ((got - want).norm() / want.norm()).item() <= 1e-4, mode
        assert backend.reports(), mode
        assert all(bool(r.count("linear")) == lowered for r in backend.reports()), mode
        assert all(bool(r.count("sdpa")) == lowered for r in backend.reports()), mode


def test_bf16_llama_logits_close_to_fp32_reference():
    model = build("llama", "sdpa")
    ids, mask = left_padded_batch(length=40)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.double()
        fast = model.to("cuda", torch.bfloat16)
        compiled = torch.compile(fast, backend="xyserve")
        got = compiled(ids.cuda(), attention_mask=mask.cuda()).logits.double().cpu()
    keep = mask.bool()  # padded query rows carry no meaning
    rel = ((got - want)[keep].norm() / want[keep].norm()).item()
    assert rel <= 3e-2, rel
