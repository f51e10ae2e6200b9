"""The engine's whole-step decode kernel path (engine/decode_kernel.py, EngineConfig.decode_megakernel).

CPU: the stacked weights and KV caches it reads, which models it takes, which steps it takes, and that
an engine asked for it on a card that cannot run it says so and decodes exactly as without it. GPU
(sm_90): an engine with the option runs batch-1 decode steps on the kernel, and every token it picks is
the argmax of the float32 model fed the same tokens, up to bf16-sized near-ties.
"""
import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.engine.engine_models import build_model, random_prompts
from tests.sm90 import requires_sm90
from xy_inductor import LLM, SamplingParams
from xy_inductor.config import EngineConfig
from xy_inductor.engine.decode_kernel import (
    DecodeKernelPath,
    prepare_weights,
    stack_weights,
    stacked,
)
from xy_inductor.engine.kv_tensors import allocate_kv_caches
from xy_inductor.engine.model_check import LayerSpec


def test_option_must_be_bool():
    assert EngineConfig(decode_megakernel=True).decode_megakernel
    with pytest.raises(ValueError, match="decode_megakernel must be a bool"):
        EngineConfig(decode_megakernel=1)


def test_stacked_weights_follow_the_layers():
    model = build_model("llama")
    w = stack_weights(model)
    layer1 = model.model.layers[1]
    nq = (4 + 2 * 2) * 16  # (q heads + 2 kv heads) x head_dim rows per layer
    assert torch.equal(w.wq[nq:nq + 64], layer1.self_attn.q_proj.weight)
    assert torch.equal(w.wq[nq + 64 + 32:2 * nq], layer1.self_attn.v_proj.weight)
    assert torch.equal(w.wg[2 * 128 + 128:], layer1.mlp.up_proj.weight)
    assert torch.equal(w.wd[128:], layer1.mlp.down_proj.weight.t())  # transposed, [I, H] per layer
    assert torch.equal(w.n2[1], layer1.post_attention_layernorm.weight)
    assert w.dims == {"NL": 2, "H": 64, "I": 128, "V": 512, "NQH": 4, "NKV": 2, "D": 16}


@pytest.mark.parametrize("family, match", [("qwen2", "bias"), ("gpt2", "not a Llama-style")])
def test_other_architectures_are_named(family, match):
    with pytest.raises(NotImplementedError, match=match):
        stack_weights(build_model(family))


def test_cpu_model_logs_why_and_gets_none(caplog):
    with caplog.at_level(logging.WARNING, logger="xyserve"):
        assert prepare_weights(build_model("llama"), True, 16) is None
    assert "decode_megakernel off" in caplog.text and "sm_90" in caplog.text
    assert prepare_weights(build_model("llama"), False, 16) is None


def test_kv_caches_are_one_stacked_tensor_when_layers_agree():
    spec = LayerSpec(4, 2, 16, 16, torch.float32)
    k, v = allocate_kv_caches([spec, spec, spec], 5, 16, torch.device("cpu"))
    assert stacked(k).shape == (3, 5, 16, 2, 16) and stacked(v) is not None
    k[1].fill_(1.0)
    assert stacked(k)[1].eq(1).all() and stacked(k)[0].eq(0).all()
    other = LayerSpec(4, 2, 32, 32, torch.float32)
    k, _ = allocate_kv_caches([spec, other], 5, 16, torch.device("cpu"))
    assert stacked(k) is None


def test_takes_only_single_token_steps_of_at_most_max_rows_requests():
    def row(n, sample=True, drafts=0):
        return SimpleNamespace(token_ids=[0] * n, sample=sample, num_draft_tokens=drafts)

    assert DecodeKernelPath.takes([row(1)])
    assert not DecodeKernelPath.takes([row(1), row(1)])  # the batch-1 kernel
    assert DecodeKernelPath.takes([row(1), row(1)], max_rows=2)
    assert not DecodeKernelPath.takes([row(1)] * 3, max_rows=2)
    assert not DecodeKernelPath.takes([row(1), row(2)], max_rows=2)
    assert not DecodeKernelPath.takes([], max_rows=2)
    assert not DecodeKernelPath.takes([row(7)])
    assert not DecodeKernelPath.takes([row(1, sample=False)])
    assert not DecodeKernelPath.takes([row(1, drafts=2)])


def test_engine_on_cpu_falls_back_to_the_same_tokens(caplog):
    prompts = random_prompts([5, 9])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = LLM(build_model("llama"), compile=False).generate(prompts, params, use_tqdm=False)
    with caplog.at_level(logging.WARNING, logger="xyserve"):
        llm = LLM(build_model("llama"), compile=False, decode_megakernel=True)
    assert "decode_megakernel off" in caplog.text
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert "decode_megakernel_steps" not in llm.stats


@pytest.mark.gpu
@requires_sm90
def test_engine_decodes_batch_one_on_the_kernel():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=8192, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    ref = LlamaForCausalLM(copy.deepcopy(config)).to(device="cuda").eval()  # its own config: the engine
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # switches the model's attention
    ref.set_attn_implementation("sdpa")
    prompt = torch.randint(0, 8192, (37,)).tolist()  # 37: the last page partly filled
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(model, max_model_len=256, decode_megakernel=True)  # decode bursts of up to 8 steps
    tokens = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    assert llm.stats["decode_megakernel_steps"] == len(tokens) - 1  # every step after the prefill
    assert llm.engine.num_steps == 4  # prefill, one step, bursts of 8 and 2
    del llm
    single = LLM(model, max_model_len=256, decode_megakernel=True, decode_burst=1)
    assert single.generate([prompt], params, use_tqdm=False)[0].token_ids == tokens  # the same launches
    assert single.engine.num_steps == len(tokens)
    del single
    with torch.no_grad():  # teacher-forced float32 logits at every decoded position
        logits = ref(torch.tensor([prompt + tokens[:-1]], device="cuda")).logits[0, len(prompt) - 1:]
    for step, token in enumerate(tokens[1:], start=1):  # the first token comes from the bf16 prefill
        row = logits[step]
        assert row[token] >= row.max() - 0.05 * (row.max() - row.min()), (step, token, row.argmax().item())


def test_sampler_takes_a_given_argmax_for_greedy_rows_only():
    from xy_inductor.engine.sampler import Sampler, SamplingRow

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingRow(SamplingParams(temperature=0), None, None)
    sampled = SamplingRow(SamplingParams(temperature=1.0, top_k=1), None, None)  # top-1: its argmax, drawn
    given = torch.tensor([7, 9])
    out = Sampler(torch.Generator().manual_seed(0)).sample_tensor(logits, [greedy, sampled], argmax=given)
    assert out.tolist() == [7, logits[1].argmax().item()]
    assert given.tolist() == [7, 9]  # the kernel's buffer is not written


def test_sampler_returns_a_given_argmax_as_is_when_every_row_is_greedy():
    from xy_inductor.engine.sampler import Sampler, SamplingRow

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingRow(SamplingParams(temperature=0), None, None)
    given = torch.tensor([7, 9])
    assert Sampler().sample_tensor(logits, [greedy, greedy], argmax=given) is given  # no copy launched
    assert Sampler().sample_tensor(logits, [greedy, greedy]).tolist() == logits.argmax(-1).tolist()


def test_decode_weights_check_their_shapes():
    w = stack_weights(build_model("llama"))
    with pytest.raises(ValueError, match="DecodeWeights.wo"):
        type(w)(**{**{f: getattr(w, f) for f in w.__slots__}, "wo": w.wo[:-1]})


@torch.no_grad()
def test_stacked_weights_and_paged_cache_match_hf():
    """The kernel's conventions (stacked q;k;v and gate;up, RoPE on the fly, the paged cache) in its
    float32 oracle against HF's own decode step, on the CPU."""
    from ascend_kernels import reference

    model = build_model("llama")
    prompt = torch.tensor(random_prompts([21])[0])[None]
    out = model(prompt, use_cache=True)
    token = out.logits[0, -1].argmax().item()
    nl, bs, nkv, hd = 2, 8, 2, 16
    k_cache = torch.zeros(nl, 6, bs, nkv, hd)
    v_cache = torch.zeros_like(k_cache)
    block_table = torch.tensor([4, 1, 5, 0], dtype=torch.int32)  # shuffled pages
    slots = block_table[torch.arange(21) // bs].long() * bs + torch.arange(21) % bs
    for layer in range(nl):
        keys, values = out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values
        k_cache[layer].view(-1, nkv, hd)[slots] = keys[0].transpose(0, 1)
        v_cache[layer].view(-1, nkv, hd)[slots] = values[0].transpose(0, 1)
    logits = reference.decode_step(stack_weights(model), k_cache, v_cache, block_table, 21, token)
    expected = model(torch.tensor([[token]]), past_key_values=out.past_key_values).logits[0, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    new_slot = block_table[21 // bs].item() * bs + 21 % bs  # the token's K/V, as HF appended them
    torch.testing.assert_close(k_cache[1].view(-1, nkv, hd)[new_slot], out.past_key_values.layers[1].keys[0, :, 21])


def test_problem_names_shapes_the_kernel_cannot_take(monkeypatch):
    from ascend_kernels import decode_step

    w = stack_weights(build_model("llama"))
    assert "sm_90" in decode_step.problem(w, 16, torch.device("cpu"))
    # past the card check, the shape rules (checked without a GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    props = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    cuda = torch.device("cuda")
    assert "bf16" in decode_step.problem(w, 16, cuda)

    def shaped(hidden, mlp, heads, head_dim):
        return SimpleNamespace(wq=torch.empty(0, dtype=torch.bfloat16), wo=torch.empty(0, dtype=torch.bfloat16),
                               wg=torch.empty(0, dtype=torch.bfloat16), wd=torch.empty(0, dtype=torch.bfloat16),
                               wl=torch.empty(0, dtype=torch.bfloat16), embed=torch.empty(0, dtype=torch.bfloat16),
                               head_dim=head_dim, dims={"NL": 16, "H": hidden, "I": mlp, "V": 128256, "NQH": heads,
                                                        "NKV": 8, "D": head_dim})

    assert decode_step.problem(shaped(2048, 8192, 32, 64), 16, cuda) is None  # Llama-3.2-1B
    assert "head_dim 128" in decode_step.problem(shaped(4096, 14336, 32, 128), 16, cuda)  # Llama-3-8B
    # the MLP is split-K over its width: any width of 8-row tiles, one per program at least
    assert decode_step.problem(shaped(2048, 6144, 32, 64), 16, cuda) is None
    assert decode_step.problem(shaped(2048, 5632, 32, 64), 16, cuda) is None
    assert "row tile" in decode_step.problem(shaped(2048, 1000, 32, 64), 16, cuda)
    # a chunk holds one row of each weight across the whole hidden size
    assert "hidden size 4096" in decode_step.problem(shaped(4096, 8192, 64, 64), 16, cuda)
    assert "hidden size 3072" in decode_step.problem(shaped(3072, 8192, 48, 64), 16, cuda)


def test_grid_candidates_split_llama_widths_evenly():
    """The start-up grid tuning times the SM count and the powers of two from the attention's programs up."""
    from ascend_kernels import decode_step

    w = SimpleNamespace(num_q_heads=32)  # 32 heads x 2 splits: 64 programs at least
    assert decode_step.grid_candidates(w, 132) == [64, 128, 132]
    assert decode_step.grid_candidates(w, 64) == [64]
    assert decode_step.grid_candidates(w, 114) == [64, 114]


def test_a_kernel_that_fails_its_first_launch_falls_back(caplog):
    """The path turns itself off, says so, and the step (and the rest) run the compiled model."""
    prompts = random_prompts([6])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = LLM(build_model("llama"), compile=False).generate(prompts, params, use_tqdm=False)
    llm = LLM(build_model("llama"), compile=False)

    class Failing:
        num_steps, argmax, max_rows = 0, None, 1
        takes = staticmethod(DecodeKernelPath.takes)

        def run(self, inputs, static, pos, num_steps=1, num_rows=1):
            self.num_steps += 1
            raise RuntimeError("no sm_90 here")

    llm.engine.runner.decode_path = Failing()
    with caplog.at_level(logging.WARNING, logger="xyserve"):
        out = llm.generate(prompts, params, use_tqdm=False)
    assert "first launch failed" in caplog.text and "no sm_90 here" in caplog.text
    assert llm.engine.runner.decode_path is None
    assert [o.token_ids for o in out] == [o.token_ids for o in expected]
