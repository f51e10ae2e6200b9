"""Models the paged kernels cannot serve exactly are refused with a clear error, never run wrong;
the compiled model gives the same tokens; the CLI and checkpoint-folder loading work."""
from __future__ import annotations

import json

import pytest
import torch
from engine_models import MAX_LEN, _COMMON, build_model, random_prompts, reference, word_tokenizer
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from xy_inductor import LLM, SamplingParams
from xy_inductor.cli import main as cli_main

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def test_sliding_window_shorter_than_max_len_is_refused():
    model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=64)).eval()
    with pytest.raises(NotImplementedError, match="sliding-window"):
        LLM(model, compile=False)
    # with max_model_len within the window the model is plain causal attention: served exactly
    prompts = random_prompts([5, 40], seed=2)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=64)).eval()
    expected = [model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    outs = LLM(model, max_model_len=64, compile=False).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected


def test_softcapping_is_refused():
    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=MAX_LEN)
    with pytest.raises(NotImplementedError, match="softcapping"):
        LLM(Gemma2ForCausalLM(config).eval(), compile=False)


def test_model_without_attention_interface_is_refused():
    model = BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=512)).eval()
    with pytest.raises(NotImplementedError, match="xyserve"):
        LLM(model, max_model_len=128, compile=False)


def test_compiled_model_gives_the_same_tokens():
    pytest.importorskip("xy_inductor.backend")  # the lead's torch.compile backend
    prompts = random_prompts([1, 70, 9, 33], seed=12)
    expected = reference("gpt2", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    llm = LLM(build_model("gpt2"), compile=True, compile_backend="xyserve", max_num_batched_tokens=32)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.runner.forward is not llm.engine.runner.model


def test_compiled_engine_uses_one_graph_for_every_step_size():
    """Steps of every token bucket and the eager steps above them run one compiled graph (on the
    H200 a specialised size once compiled one graph per bucket; benchmarks/RESULTS.md)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    prompts = random_prompts([3, 41, 17, 90], seed=16)
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    llm = LLM(build_model("llama"), compile=True, cuda_graphs=True, cuda_graph_sizes=[2, 4, 8, 16, 32],
              max_num_batched_tokens=64)
    sizes = []
    prepare = llm.engine.runner.prepare

    def recorded(out, feed=None):
        step = prepare(out, feed)
        sizes.append(step.layout.num_tokens)
        return step

    llm.engine.runner.prepare = recorded
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert len(set(sizes)) >= 3 and max(sizes) > 32  # several buckets and an eager step
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("compile", [False, True])
def test_attention_switched_back_between_engine_calls(compile, caplog):
    """HF generate between engine calls (attention back to "sdpa") must not make the engine ignore
    its paged KV cache: it switches the attention again, says so, and the tokens stay right."""
    prompts = random_prompts([5, 23], seed=15)
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    model = build_model("llama")
    llm = LLM(model, compile=compile, max_num_batched_tokens=32)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    model.set_attn_implementation("sdpa")
    hf_tokens = model.generate(torch.tensor([prompts[0]]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompts[0]):].tolist()
    assert hf_tokens == expected[0]
    with caplog.at_level("WARNING", logger="xyserve"):
        assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert "switching it back" in caplog.text


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_compiled_engine_fuses_sibling_projections(name):
    """The engine packs q/k/v and gate/up and the backend fuses each group into one GEMM."""
    from xy_inductor.backend import reports, reset_reports

    prompts = random_prompts([3, 41, 17], seed=14)
    expected = reference(name, tuple(map(tuple, prompts)), GREEDY.max_tokens)
    model = build_model(name)
    torch._dynamo.reset()  # an earlier test's graph for the same model class would be reused
    reset_reports()
    llm = LLM(model, compile=True, compile_backend="xyserve", max_num_batched_tokens=32)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert reports()[-1].count("sibling_linears") == 2 * model.config.num_hidden_layers
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(model.model.layers[0].mlp.up_proj.weight.clone())
    with pytest.raises(RuntimeError, match="replaced by a new tensor"):
        llm.generate(prompts, GREEDY, use_tqdm=False)


def test_engine_with_norms_fused_into_the_gemvs():
    """Opt-in (`fuse_norm_linear`, off by default: slower end to end today, benchmarks/RESULTS.md):
    each RMSNorm and its residual add run inside the projection they feed; same greedy tokens."""
    from xy_inductor.backend import reports, reset_reports

    prompts = random_prompts([3, 41, 17], seed=12)
    expected = reference("llama", tuple(map(tuple, prompts)), GREEDY.max_tokens)
    model = build_model("llama")
    torch._dynamo.reset()
    reset_reports()
    options = {"lower_gemm": False, "fuse_norm_linear": True}
    llm = LLM(model, compile=True, compile_options=options, max_num_batched_tokens=32)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    layers = model.config.num_hidden_layers
    assert reports()[-1].count("norm_linear") == layers and reports()[-1].count("norm_linear_gated") == layers


def test_cli_generate_from_checkpoint_folder(tmp_path, capsys):
    model, tok = build_model("llama"), word_tokenizer()
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    prompts = random_prompts([4, 25], seed=13)
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": " ".join(f"w{t}" for t in prompts[0])}) + "\n"
        + json.dumps({"prompt_token_ids": prompts[1]}) + "\n"
    )
    out_file = tmp_path / "out.jsonl"
    rc = cli_main(["generate", "--model", str(tmp_path / "ckpt"), "--prompts-file", str(tmp_path / "prompts.jsonl"),
                   "--max-tokens", "5", "--ignore-eos", "--no-compile", "--quiet", "-o", str(out_file)])
    assert rc == 0
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt_token_ids"] for r in records] == prompts
    assert [r["token_ids"] for r in records] == reference("llama", tuple(map(tuple, prompts)), 5)
    assert all(r["finish_reason"] == "length" and r["text"] for r in records)
    for spec in (["--ngram"], ["--draft-model", str(tmp_path / "ckpt")]):  # speculative: same greedy tokens
        spec_file = tmp_path / "spec.jsonl"
        assert cli_main(["generate", "--model", str(tmp_path / "ckpt"), "--prompts-file", str(tmp_path / "prompts.jsonl"),
                         "--max-tokens", "5", "--ignore-eos", "--no-compile", "--quiet", "-o", str(spec_file),
                         *spec, "--num-speculative-tokens", "2"]) == 0
        assert [json.loads(line)["token_ids"] for line in spec_file.read_text().splitlines()] == [r["token_ids"] for r in records]
    assert cli_main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "w1", "--max-tokens", "0",
                     "--no-compile", "--quiet"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_engine_compile_options_add_combo_kernels_on_cuda_only():
    from xy_inductor.config import EngineConfig
    from xy_inductor.engine.compiled_model import _options

    model = build_model("llama")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = EngineConfig(compile_options={"lower_gemm": False, "fuse_sibling_linears": False})
    options, packed = _options(model, plain, cuda)
    assert packed is None and options["inductor_config"] == {"combo_kernels": True}
    assert "inductor_config" not in _options(model, plain, cpu)[0]
    # a caller's own setting wins, and the caller's dict is not modified
    mine = {"combo_kernels": False, "max_autotune": False}
    own = EngineConfig(compile_options={"fuse_sibling_linears": False, "inductor_config": mine})
    assert _options(model, own, cuda)[0]["inductor_config"] == mine and mine == {"combo_kernels": False,
                                                                                  "max_autotune": False}
    # other backends get the caller's options untouched
    assert _options(model, EngineConfig(compile_backend="inductor"), cuda)[0] is None
