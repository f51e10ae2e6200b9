"""Residual add + RMSNorm + linear (and SiLU x up) -> xyserve::norm_linear: what is rewritten, what
is left to Inductor and why, and the numbers (against eager)."""
from __future__ import annotations

import pytest
import torch

from tests.lowering.tiny_decoders import VOCAB, build
from xy_inductor.backend import reports, reset_reports
from xy_inductor.engine.weight_packing import pack_sibling_linears


def _compiled(model, ids, dynamic, impl="auto", **opts):
    torch._dynamo.reset()
    reset_reports()
    options = {"fuse_sibling_linears": True, "fuse_norm_linear": True, "lower_gemm": False, "impl": impl, **opts}
    fn = torch.compile(model, backend="xyserve", options=options, dynamic=dynamic)
    with torch.no_grad():
        logits = fn(ids).logits
    return logits, reports()[-1]


@pytest.mark.parametrize("dynamic", [False, True])  # eps: a constant, or a 0-d tensor input under dynamic
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_llama_layers_fuse_both_norms_and_match_eager(dynamic, impl):
    model = build("llama")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    pack_sibling_linears(model)
    logits, report = _compiled(model, ids, dynamic, impl)
    layers = model.config.num_hidden_layers
    # per layer: input norm -> q/k/v, post-attention norm -> gate/up (+ SiLU x up); the final norm
    # feeds lm_head through a slice and stays with Inductor
    assert report.count("norm_linear") == layers and report.count("norm_linear_gated") == layers
    assert not [s for s in report.skipped if s.what == "norm_linear"]
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_unpacked_projections_are_left_to_inductor_with_a_reason():
    """Without packed siblings the input norm feeds q, k and v: nothing to fuse into one GEMV."""
    model = build("llama")
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    logits, report = _compiled(model, ids, True, fuse_sibling_linears=False)
    assert report.count("norm_linear", "norm_linear_gated") == 0
    reasons = {s.reason for s in report.skipped if s.what == "norm_linear"}
    assert reasons == {"the norm feeds several nodes"}
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_biased_projections_and_other_norms():
    """Qwen2's q/k/v carry a bias (left to Inductor, reported; its MLP still fuses); Gemma's norm
    scales by (1 + w), which is not this pattern, so nothing of it is rewritten."""
    for name, gated, plain, skipped in (("qwen2", 2, 0, 2), ("gemma", 0, 0, 0)):
        model = build(name)
        ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = model(ids).logits
        pack_sibling_linears(model)
        logits, report = _compiled(model, ids, True)
        assert report.count("norm_linear_gated") == gated and report.count("norm_linear") == plain
        assert len([s for s in report.skipped if s.what == "norm_linear"]) == skipped
        assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_norm_linear_op_passes_opcheck():
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    w_norm, w = torch.rand(16) + 0.5, torch.randn(24, 16)
    eps = torch.tensor(1e-6, dtype=torch.float64)
    for args in ((x, r, w_norm, None, 1e-6, w, True, "reference"), (x, None, w_norm, eps, 0.0, w, False, "reference")):
        torch.library.opcheck(torch.ops.xyserve.norm_linear.default, args)
