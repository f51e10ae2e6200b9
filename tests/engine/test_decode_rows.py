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
    its logits go to row r of `rows_logits`, its greedy token to tokens_out[r]; with loop=True (a burst's
    launch) also over input_ids[r], and the row's position and slot step to the next position."""

    max_rows = 3
    rows_loop = True

    def __init__(self, w, k_cache, v_cache):
        super().__init__(w, k_cache, v_cache)
        self.rows_logits = torch.zeros(self.max_rows, w.embed.shape[0])
        self.rows_per_launch: list[int] = []
        self.loop_launches = 0

    def launch_rows(self, input_ids, position_ids, block_table, slot_mapping, tokens_out, loop=False):
        bs = self.k_cache.shape[2]
        real = [r for r in range(input_ids.shape[0]) if slot_mapping[r] >= 0]
        for r in real:
            self.rows_logits[r] = reference.decode_step(self.w, self.k_cache, self.v_cache, block_table[r],
                                                        int(position_ids[r]), int(input_ids[r]))
            tokens_out[r] = self.rows_logits[r].argmax()
            if loop:
                p = int(position_ids[r]) + 1
                input_ids[r], position_ids[r] = tokens_out[r], p
                slot_mapping[r] = int(block_table[r, p // bs]) * bs + p % bs
        self.rows_per_launch.append(len(real))
        self.loop_launches += loop


def _llm(async_scheduling: bool = False, decode_burst: int = 1) -> tuple[LLM, ReferenceRows]:
    llm = LLM(build_model("llama"), compile=False, decode_burst=decode_burst, async_scheduling=async_scheduling)
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


def test_bursts_of_rows_give_the_tokens_of_single_steps():
    prompts = random_prompts([5, 11, 8])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 12, 12)]
    llm, kernel = _llm(async_scheduling=True, decode_burst=4)
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == _plain(prompts, params)
    assert kernel.loop_launches >= 4  # at least one burst of the three rows (4 launches)
    # a burst's rows decode together: the rows of a loop launch are every running request
    assert 3 in kernel.rows_per_launch


def test_a_stop_inside_a_burst_of_rows_ends_that_request_only():
    prompts = random_prompts([5, 11, 8])
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    expected = _plain(prompts, plain)
    # the second request stops at its first new token from the sixth on (inside a burst of 4 after the first)
    first = next(i for i in range(5, 14) if expected[1].index(expected[1][i]) == i)
    params = [plain, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True,
                                    stop_token_ids=[expected[1][first]]), plain]
    llm, kernel = _llm(async_scheduling=True, decode_burst=4)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in out] == [expected[0], expected[1][: first + 1], expected[2]]
    assert out[1].finish_reason == "stop" and kernel.loop_launches > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks  # burst blocks freed with the rest


def test_a_sampled_request_among_the_rows_stops_bursts():
    prompts = random_prompts([5, 11, 8])
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 2
    params.append(SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, seed=3))  # sampled: no bursts
    llm, kernel = _llm(async_scheduling=True, decode_burst=4)
    llm.generate(prompts, params, use_tqdm=False)
    assert kernel.loop_launches == 0


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


def test_scheduler_bursts_every_row_by_the_shortest_room():
    from xy_inductor.engine.kv_cache import KVCacheManager
    from xy_inductor.engine.request import Request
    from xy_inductor.engine.scheduler import Scheduler

    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4)
    a = Request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=9), max_model_len=64)
    b = Request("b", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4), max_model_len=64)
    for r in (a, b):
        sched.add_request(r)
    sched.schedule()  # the prefills
    a.num_computed_tokens, a.output_token_ids = 3, [5]
    b.num_computed_tokens, b.output_token_ids = 4, [6]
    rows = sched.schedule(max_steps=8).rows
    assert [r.num_steps for r in rows] == [2, 2]  # b has 3 tokens left: bursts of a power of two, 2
    assert len(kv.block_table("a")) == 2 and len(kv.block_table("b")) == 2  # KV for both rows' 2 positions
