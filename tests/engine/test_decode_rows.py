"""Decode steps of several requests on a whole-step kernel that takes several rows
(DecodeKernelPath.max_rows > 1, `launch_rows`).

CPU: the kernel is stood in for by its float32 oracle (ascend_kernels.reference) run row by row, so
the engine's side runs here: which steps the kernel takes, the rows' tokens and logits reaching the
sampler, and steps with more requests than the kernel takes falling back to the compiled model.
"""
import pytest
import torch

from ascend_kernels import reference
from tests.engine.engine_models import build_model, random_prompts
from tests.engine.test_decode_burst import ReferenceLoop
from xy_inductor import LLM, SamplingParams
from xy_inductor.engine.decode_kernel import DecodeKernelPath, stack_weights, stacked


class ReferenceRows(ReferenceLoop):
    """A multi-row kernel: each real row (slot >= 0) of the step decodes its token in float32 torch;
    its logits go to row r of `rows_logits`, its greedy token to tokens_out[r]."""

    max_rows = 3

    def __init__(self, w, k_cache, v_cache):
        super().__init__(w, k_cache, v_cache)
        self.rows_logits = torch.zeros(self.max_rows, w.embed.shape[0])
        self.rows_per_launch: list[int] = []

    def launch_rows(self, input_ids, position_ids, block_table, slot_mapping, tokens_out):
        real = [r for r in range(input_ids.shape[0]) if slot_mapping[r] >= 0]
        for r in real:
            self.rows_logits[r] = reference.decode_step(self.w, self.k_cache, self.v_cache, block_table[r],
                                                        int(position_ids[r]), int(input_ids[r]))
            tokens_out[r] = self.rows_logits[r].argmax()
        self.rows_per_launch.append(len(real))


def _llm(async_scheduling: bool = False) -> tuple[LLM, ReferenceRows]:
    llm = LLM(build_model("llama"), compile=False, decode_burst=1, async_scheduling=async_scheduling)
    runner = llm.engine.runner
    w = stack_weights(runner.model)
    kernel = ReferenceRows(w, stacked(runner.k_caches), stacked(runner.v_caches))
    runner.decode_path = DecodeKernelPath(w, runner.k_caches, runner.v_caches, runner.block_size,
                                          runner.max_model_len, kernel=kernel)
    return llm, kernel


def _plain(prompts, params):
    llm = LLM(build_model("llama"), compile=False)
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_rows_decode_the_tokens_of_the_compiled_model(async_scheduling):
    prompts = random_prompts([5, 11, 8])
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    llm, kernel = _llm(async_scheduling)
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == _plain(prompts, params)
    assert kernel.rows_per_launch and max(kernel.rows_per_launch) == 3  # the three requests in one launch
    assert llm.engine.runner.stats["decode_megakernel_steps"] == len(kernel.rows_per_launch) + kernel.num_launches


def test_more_requests_than_rows_run_the_compiled_model_until_some_finish():
    prompts = random_prompts([5, 9, 6, 7])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 8, 8, 8)]
    llm, kernel = _llm()
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == _plain(prompts, params)
    # four decoding rows are one too many; once the first request is done the other three take the kernel
    assert kernel.rows_per_launch and set(kernel.rows_per_launch) == {3}


def test_rows_option_needs_the_decode_kernel_and_says_why_it_is_off(caplog):
    from xy_inductor.config import EngineConfig
    from xy_inductor.engine.decode_kernel import rows_kernel

    with pytest.raises(ValueError, match="needs decode_megakernel=True"):
        EngineConfig(decode_megakernel_rows=True)
    with pytest.raises(ValueError, match="must be a bool"):
        EngineConfig(decode_megakernel=True, decode_megakernel_rows=1)
    llm = LLM(build_model("llama"), compile=False)
    runner = llm.engine.runner
    with caplog.at_level("WARNING"):
        assert rows_kernel(stack_weights(runner.model), runner.k_caches, runner.v_caches, runner.block_size) is None
    assert "decode_megakernel_rows off" in caplog.text  # a CPU model: the reason is logged, nothing breaks
