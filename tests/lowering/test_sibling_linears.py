"""Sibling linears over adjacent weights: one GEMM per q/k/v and gate/up group, same numbers."""
from __future__ import annotations

import pytest
import torch

from tests.lowering.tiny_decoders import VOCAB, build
from xy_inductor.backend import reports, reset_reports
from xy_inductor.engine.weight_packing import pack_sibling_linears


def _compile_counts(model, ids, fuse=True):
    torch._dynamo.reset()
    reset_reports()
    opts = {"fuse_sibling_linears": fuse, "lower_gemm": True}
    fn = torch.compile(model, backend="xyserve", options=opts, dynamic=True)
    with torch.no_grad():
        logits = fn(ids).logits
    last = reports()[-1]
    return logits, last.count("sibling_linears"), last.count("linear")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_packed_groups_fuse_and_match_eager(name):
    """Qwen2 has q/k/v biases: those are packed and fused too."""
    model = build(name)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids).logits
    packed = pack_sibling_linears(model)
    layers = model.config.num_hidden_layers
    biases = 3 * layers if name == "qwen2" else 0
    assert packed.num_params == 5 * layers + biases
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    logits, fused, lowered = _compile_counts(model, ids)
    assert fused == 2 * layers  # one q/k/v and one gate/up group per layer
    # per layer: qkv, o, gate_up, down; plus lm_head
    assert lowered == 4 * layers + 1
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_unpacked_weights_are_left_alone():
    model = build("llama")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    logits, fused, lowered = _compile_counts(model, ids)
    assert fused == 0 and lowered == 7 * model.config.num_hidden_layers + 1
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_fusion_is_off_unless_asked():
    model = build("llama")
    pack_sibling_linears(model)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    _, fused, _ = _compile_counts(model, ids, fuse=False)
    assert fused == 0


def test_packing_twice_moves_nothing():
    """A second engine on the same model packs again: the first one's graph must keep reading the
    weights where they are."""
    model = build("llama")
    first = pack_sibling_linears(model)
    second = pack_sibling_linears(model)
    assert second.slots == first.slots
    first.check()


def test_in_place_updates_are_seen_and_swaps_are_refused():
    model = build("llama")
    packed = pack_sibling_linears(model)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    fn = torch.compile(model, backend="xyserve", options={"fuse_sibling_linears": True}, dynamic=True)
    with torch.no_grad():
        fn(ids)
        model.model.layers[0].self_attn.k_proj.weight.mul_(2.0)  # in place: the fused GEMM reads it
        torch.testing.assert_close(fn(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    packed.check()
    layer = model.model.layers[1].mlp
    layer.up_proj.weight = torch.nn.Parameter(layer.up_proj.weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced by a new tensor"):
        packed.check()


def test_packed_model_saves_and_loads_as_before(tmp_path):
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pack_sibling_linears(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
