"""RoPE's cos / sin tables are computed once and read by every layer, with the same numbers."""
from __future__ import annotations

import pytest
import torch
from torch import fx

from lowering.report import LoweringReport
from lowering.shared_tables import SharedTablePass
from tests.lowering.tiny_decoders import VOCAB, build
from xy_inductor.backend import reports, reset_reports

MATERIALIZE = torch.ops.xyserve.materialize.default


def _compile(model, ids, **options):
    torch._dynamo.reset()
    reset_reports()
    fn = torch.compile(model, backend="xyserve", options=options, dynamic=True)
    with torch.no_grad():
        return fn(ids).logits, reports()[-1]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_rotary_tables_shared_and_logits_unchanged(name):
    model = build(name)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    logits, report = _compile(model, ids)
    assert report.count("shared_table") == 2  # cos and sin, each read by every layer's q and k
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    off, report_off = _compile(model, ids, share_tables=False)
    assert report_off.count("shared_table") == 0
    torch.testing.assert_close(off, logits, rtol=1e-5, atol=1e-5)


def test_model_without_rotary_is_left_alone():
    model = build("gpt2")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    _, report = _compile(model, ids)
    assert report.count("shared_table") == 0


def _traced(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def test_fan_out_point_and_idempotence():
    def shared(x, q, k):
        c = (x.cos() * 2.0).to(torch.float32)
        return q * c + k * c

    def single(x, q):
        return q * (x.sin() * 2.0)

    gm = _traced(shared)
    report = LoweringReport()
    SharedTablePass()(gm, report)
    SharedTablePass()(gm, report)  # Dynamo may run the backend twice on one graph
    gm.recompile()
    assert report.count("shared_table") == 1
    (node,) = [n for n in gm.graph.nodes if n.target is MATERIALIZE]
    assert node.args[0].target == "to" and len(node.users) == 2  # after the cast, where it fans out
    x, q, k = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(gm(x, q, k), shared(x, q, k))

    gm = _traced(single)
    SharedTablePass()(gm, report)
    assert not any(n.target is MATERIALIZE for n in gm.graph.nodes)  # one consumer: nothing recomputed


def test_materialize_op_contract():
    x = torch.randn(4, 6).t()  # non-contiguous in, contiguous out
    y = MATERIALIZE(x)
    assert torch.equal(y, x) and y.is_contiguous() and y.data_ptr() != x.data_ptr()
    torch.library.opcheck(torch.ops.xyserve.materialize, (x,))


def test_outer_product_matmul_becomes_an_exact_multiply():
    def angles(inv_freq, pos, a, b):
        # the rotary angles, plus matmuls the rewrite must leave alone (contraction of length 3)
        return inv_freq @ pos, a @ b, torch.matmul(pos.transpose(1, 2), inv_freq.transpose(1, 2))

    gm = _traced(angles)
    g = torch.Generator().manual_seed(0)
    args = (torch.rand(2, 8, 1, generator=g), torch.arange(6.0).expand(2, 1, 6), torch.randn(2, 4, 3, generator=g),
            torch.randn(2, 3, 5, generator=g))
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*args)
    report = LoweringReport()
    SharedTablePass()(gm, report)
    gm.recompile()
    assert report.count("outer_product") == 2  # [2, 8, 1] @ [2, 1, 6] and [2, 6, 1] @ [2, 1, 8]
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.matmul,)]
    assert len(matmuls) == 0 and sum(n.target is torch.mul for n in gm.graph.nodes) == 2
    for got, want in zip(gm(*args), angles(*args)):
        assert torch.equal(got, want)  # one product per element: bitwise equal


def test_outer_product_rewrite_under_dynamo():
    # the rotary angles as transformers <= 5.17 computes them (newer versions multiply already)
    def angles(inv_freq, position_ids):
        inv = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        return torch.cat((freqs, freqs), dim=-1).cos()

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = torch.arange(9).expand(2, 9)
    torch._dynamo.reset()
    reset_reports()
    got = torch.compile(angles, backend="xyserve", dynamic=True)(inv_freq, pos)
    assert reports()[-1].count("outer_product") == 1
    torch._dynamo.reset()
    kept = torch.compile(angles, backend="xyserve", dynamic=True, options={"share_tables": False})(inv_freq, pos)
    assert reports()[-1].count("outer_product") == 0
    assert torch.equal(got, kept)  # the same angles into the same compiled cos
    torch.testing.assert_close(got, angles(inv_freq, pos), rtol=1e-6, atol=1e-6)
