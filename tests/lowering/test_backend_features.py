"""Backend features: explain, rewrite counters, options, dynamic shapes, unsupported variants."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import xy_inductor
from tiny_decoders import build, left_padded_batch
from xy_inductor import backend


def test_backend_found_by_name_in_a_fresh_process():
    code = "import torch; print('xyserve' in torch._dynamo.list_backends())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_explain_counts_every_linear_and_attention(attn):
    ids, mask = left_padded_batch()
    report = xy_inductor.explain(build("llama", attn), ids, attention_mask=mask)
    print(report)
    pattern = "sdpa" if attn == "sdpa" else "eager_attention"
    assert report.graph_count == 1 and report.graph_break_count == 0
    assert report.lowered["linear"] == 15  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    assert report.lowered[pattern] == 2
    assert report.lowered["repeat_kv"] == 4  # k and v of each layer: GQA, nothing materialised
    assert report.per_layer[0] == report.per_layer[1]
    assert report.left_to_inductor == []


def test_gpt2_conv1d_is_lowered_as_addmm_with_kn_weight():
    ids, mask = left_padded_batch()
    report = xy_inductor.explain(build("gpt2", "sdpa"), ids, attention_mask=mask)
    assert report.lowered["addmm"] == 8 and report.lowered["linear"] == 1 and report.lowered["sdpa"] == 2


def test_soft_capping_is_left_alone_reported_and_exact():
    model = build("gemma2_softcap", "eager")
    ids, mask = left_padded_batch()
    report = xy_inductor.explain(model, ids, attention_mask=mask)
    assert report.lowered.get("eager_attention", 0) == 0
    reasons = [s.reason for s in report.left_to_inductor if s.what == "attention"]
    assert len(reasons) == 2 and all("soft-capping" in r for r in reasons)
    assert "soft-capping" in str(report)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model, backend="xyserve")(ids, attention_mask=mask).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_options_switch_passes_and_reject_unknown_keys():
    model = build("llama", "sdpa")
    ids, mask = left_padded_batch()
    torch._dynamo.reset()
    backend.reset_reports()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        opts = {"lower_gemm": False, "impl": "reference", "use_inductor": False}
        got = torch.compile(model, backend="xyserve", options=opts)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want)
    (report,) = backend.reports()
    assert report.count("linear") == 0 and report.count("sdpa") == 2
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown backend option"):
        with torch.no_grad():
            torch.compile(model, backend="xyserve", options={"lower_everything": True})(ids)
    with pytest.raises(ValueError, match="impl must be one of"):
        xy_inductor.CompileOptions(impl="cuda")


def _graphs_for_two_generates(model, backend_name: str) -> int:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.forward = torch.compile(model.__class__.forward.__get__(model), backend=backend_name)
    for length in (7, 11):
        ids, mask = left_padded_batch(length=length)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_dynamic_shapes_recompile_no_more_than_dynamo_needs():
    model = build("llama", "sdpa")
    baseline = _graphs_for_two_generates(model, "inductor")  # plain Inductor, same Dynamo settings
    ours = _graphs_for_two_generates(model, "xyserve")
    limit = torch._dynamo.config.recompile_limit
    print(f"graphs compiled: xyserve {ours}, Inductor alone {baseline}, recompile limit {limit}")
    assert ours <= baseline
    assert ours < limit  # no silent fallback to eager


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dynamic_true_lowers_symbolic_scale_and_stays_exact(attn):
    """Under dynamic=True Dynamo passes HF's float `scaling` as a SymFloat node: still lowered."""
    model = build("llama", attn)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend.reset_reports()
    fwd = torch.compile(model.forward, backend="xyserve", dynamic=True)
    with torch.no_grad():
        for n in (5, 9, 30):
            ids = torch.randint(1, 128, (1, n))
            want = model(ids, use_cache=False).logits
            got = fwd(ids, use_cache=False).logits
            assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for every token count
    for report in backend.reports():  # Dynamo may hand the backend the same graph twice
        assert report.count("sdpa", "eager_attention") == 2 and report.count("linear") == 15


def test_lowering_auto_lowers_unless_cuda_runs_without_cuda_graphs():
    from xy_inductor.backend import lowered_here
    from xy_inductor.config import CompileOptions

    graphs = torch._inductor.list_mode_options("reduce-overhead")
    assert CompileOptions().lower_gemm is None and CompileOptions().lower_attention is None
    assert lowered_here(None, on_cuda=False, patches={})  # CPU (and the interpreter): lowered
    assert not lowered_here(None, on_cuda=True, patches={})  # eager launches on a GPU: SDPA / cuBLAS
    assert lowered_here(None, on_cuda=True, patches=graphs)  # replayed in CUDA graphs: lowered
    assert lowered_here(True, on_cuda=True, patches={}) and not lowered_here(False, on_cuda=False, patches={})
    for name in ("lower_gemm", "lower_attention"):
        with pytest.raises(TypeError, match=name):
            CompileOptions(**{name: "yes"})


def test_graph_that_needs_gradients_is_left_to_inductor_and_trains_exactly(caplog):
    """The xyserve ops have no backward: a graph traced with grad goes to Inductor unlowered, with
    a warning, and its gradients match eager; the same model under no_grad is lowered."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    x = torch.randn(3, 16)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    backend.reset_reports()
    compiled = torch.compile(model, backend="xyserve")
    backend._say_training_stays_on_inductor.cache_clear()  # said once per process
    with caplog.at_level("WARNING", logger="xyserve"):
        compiled(x).square().sum().backward()
    assert "needs gradients" in caplog.text
    assert [r.count("linear") for r in backend.reports()] == [0]
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g)
    backend.reset_reports()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert backend.reports() and all(r.count("linear") == 2 for r in backend.reports())
