"""Decode bursts (EngineConfig.decode_burst): a lone greedy request decodes several tokens per engine
step on the whole-step kernel, which feeds each token to its next launch on the device.

CPU: the kernel's decode loop is stood in for by its float32 oracle (ascend_kernels.reference), so the
engine's side of bursts runs here: scheduling, the PENDING tokens, stops inside a burst, the prefix
cache and the KV pool. The real kernel's bursts are checked on the GPU (test_decode_kernel.py).
"""
import pytest

from ascend_kernels import reference
from tests.engine.engine_models import build_model, random_prompts
from xy_inductor import LLM, SamplingParams
from xy_inductor.config import EngineConfig
from xy_inductor.engine.decode_kernel import DecodeKernelPath, stack_weights, stacked
from xy_inductor.engine.kv_cache import KVCacheManager
from xy_inductor.engine.request import Request
from xy_inductor.engine.scheduler import Scheduler


class ReferenceLoop:
    """The kernel's decode loop (launch with loop=True) in float32 torch: the token's logits, then its
    greedy token written over the input token, recorded at tokens_out[pos], and the position stepped."""

    def __init__(self, w, k_cache, v_cache):
        self.w, self.k_cache, self.v_cache = w, k_cache, v_cache
        self.logits, self.num_launches = None, 0

    def launch(self, token, pos, block_table, tokens_out, loop=False):
        assert loop  # token, pos: the step's input_ids / position_ids rows; the kernel reads element 0
        p = int(pos[0])
        self.logits = reference.decode_step(self.w, self.k_cache, self.v_cache, block_table, p, int(token[0]))
        nxt = int(self.logits.argmax())
        token[0], tokens_out[p], pos[0] = nxt, nxt, p + 1
        self.num_launches += 1


def _llm(async_scheduling: bool = True, **kwargs) -> LLM:
    """A CPU engine (overlapped unless asked) whose batch-1 decode steps run the reference loop."""
    llm = LLM(build_model("llama"), compile=False, async_scheduling=async_scheduling, **kwargs)
    runner = llm.engine.runner
    w = stack_weights(runner.model)
    kernel = ReferenceLoop(w, stacked(runner.k_caches), stacked(runner.v_caches))
    runner.decode_path = DecodeKernelPath(w, runner.k_caches, runner.v_caches, runner.block_size,
                                          runner.max_model_len, kernel=kernel)
    return llm


def _plain(prompts, params, **kwargs):
    llm = LLM(build_model("llama"), compile=False, **kwargs)
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_option_is_a_positive_int():
    assert EngineConfig(decode_burst=1).decode_burst == 1
    with pytest.raises(ValueError, match="decode_burst must be a positive int"):
        EngineConfig(decode_burst=0)


def test_bursts_give_the_tokens_of_single_steps():
    prompts = random_prompts([13])
    params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    llm = _llm(decode_burst=4)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert out[0].token_ids == _plain(prompts, params)[0]
    path = llm.engine.runner.decode_path
    assert path.num_steps == 22  # every token after the prefill's
    # the prefill, one single step (the path must have run before it bursts), five 4-step bursts and a
    # last single step (max_tokens leaves room for one)
    assert llm.engine.num_steps == 1 + 1 + 5 + 1
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_a_stop_inside_a_burst_drops_the_tokens_after_it():
    prompts = random_prompts([9])
    expected = _plain(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    # the first new token from the seventh on (tokens 6-9 are the second 4-step burst's) stops the request
    first = next(i for i in range(6, 20) if expected.index(expected[i]) == i)
    stop = expected[first]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop])
    llm = _llm(decode_burst=4)
    chunks = list(llm.stream(prompts, params))
    assert chunks[-1].token_ids == expected[: first + 1] and chunks[-1].finish_reason == "stop"
    assert [t for c in chunks for t in c.new_token_ids] == expected[: first + 1]
    assert max(len(c.new_token_ids) for c in chunks) > 1  # tokens came in groups
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_no_bursts_beside_other_requests_and_the_same_tokens():
    prompts = random_prompts([7, 30])
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    llm = _llm(decode_burst=8)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in out] == _plain(prompts, params)
    # the kernel took only the first request's steps after the second finished
    assert 0 < llm.engine.runner.decode_path.num_steps < 23


def test_burst_blocks_enter_the_prefix_cache_with_their_tokens():
    """A request that continues a bursted one hits the blocks its bursts filled (hashed from the real
    tokens, not the placeholders) and decodes what a fresh engine decodes."""
    prompt = random_prompts([4])[0]
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    llm = _llm(decode_burst=8)
    first = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    follow = prompt + first[:45]  # 49 tokens: blocks of positions 0-15, 16-31, 32-47 filled by decode steps
    hits_before = llm.engine.kv.num_hit_blocks
    again = llm.generate([follow], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert llm.engine.kv.num_hit_blocks - hits_before == 3
    assert again[0].token_ids == _plain([follow], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]


def test_scheduler_bursts_only_a_lone_greedy_decode():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4)

    def request(rid, **params):
        return Request(rid, [1, 2, 3], SamplingParams(**params), max_model_len=64)

    greedy = request("a", temperature=0, max_tokens=7)
    sched.add_request(greedy)
    assert sched.schedule(max_steps=8).rows[0].num_steps == 1  # the prefill
    greedy.num_computed_tokens, greedy.output_token_ids = 3, [5]
    row = sched.schedule(max_steps=8).rows[0]
    assert row.num_steps == 4 and len(kv.block_table("a")) == 2  # 6 tokens left -> 4; KV for positions 3..6
    assert sched.schedule(max_steps=1).rows[0].num_steps == 1
    sched.advance(sched.schedule(max_steps=2))
    assert greedy.output_token_ids[-2:] == [-1, -1] and greedy.num_computed_tokens == 5
    sampled = request("b", temperature=1.0, max_tokens=7)
    sampled.output_token_ids = [5]
    sched2 = Scheduler(KVCacheManager(num_blocks=32, block_size=4), 64, 4)
    sched2.add_request(sampled)
    sched2.schedule()
    sampled.num_computed_tokens = 3
    assert sched2.schedule(max_steps=8).rows[0].num_steps == 1  # sampled rows take the sampler


def test_in_order_steps_never_burst():
    llm = _llm(async_scheduling=False, decode_burst=8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    out = llm.generate(random_prompts([11]), params, use_tqdm=False)
    assert out[0].token_ids == _plain(random_prompts([11]), params)[0]
    assert llm.engine.num_steps == 10 and llm.engine.runner.decode_path.num_steps == 9


class GriddedLoop(ReferenceLoop):
    """The reference loop with the batch-1 kernel's grid choice: a grid per context length."""

    def __init__(self, w, k_cache, v_cache, long_pos: int):
        super().__init__(w, k_cache, v_cache)
        self.long_pos, self.grids = long_pos, []

    def grid_for(self, pos: int) -> int:
        return 128 if pos >= self.long_pos else 64

    def launch(self, token, pos, block_table, tokens_out, loop=False, grid=None):
        self.grids.append((int(pos[0]), grid))
        super().launch(token, pos, block_table, tokens_out, loop)


def test_each_burst_runs_on_the_grid_of_its_first_position():
    prompts = random_prompts([13])
    params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    llm = _llm(decode_burst=4)
    runner = llm.engine.runner
    kernel = GriddedLoop(runner.decode_path.kernel.w, runner.decode_path.kernel.k_cache,
                         runner.decode_path.kernel.v_cache, long_pos=20)
    runner.decode_path.kernel = kernel
    out = llm.generate(prompts, params, use_tqdm=False)
    assert out[0].token_ids == _plain(prompts, params)[0]  # any grid gives the same tokens
    assert {g for _, g in kernel.grids} == {64, 128}
    # a burst keeps the grid of its first position: one that starts below 20 may run past it on 64
    assert all(g == 64 for p, g in kernel.grids if p < 20)
    assert all(p >= 20 for p, g in kernel.grids if g == 128)
