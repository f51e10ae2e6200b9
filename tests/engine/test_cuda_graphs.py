"""Token buckets and CUDA graphs: steps padded virtually to a bucket give the same tokens.

On CPU, `cuda_graphs=True` pads every step to its bucket without capturing (the padding logic);
the GPU tests capture and replay real graphs and compare with eager steps and HF generate.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_models import build_model, random_prompts, reference

from ascend_kernels import reference as ref_kernels
from ascend_kernels import tiling
from ascend_kernels.attention import paged_attention
from ascend_kernels.profiles import CPU_INTERPRETER
from xy_inductor import LLM, SamplingParams
from xy_inductor.engine.cuda_graphs import bucket_sizes
from xy_inductor.engine.outputs import ScheduledRequest, Stage
from xy_inductor.engine.overlap import TokenFeed
from xy_inductor.engine.step_buffer import MERGE_GAP, WIDE_ROWS, StepBuffer, StepLayout, step_shape, views
from xy_inductor.engine.task_tables import TaskTables, table_capacity

LENGTHS = [1, 300, 7, 64, 129, 2, 33, 16]
NEW = 6
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def record_layouts(llm: LLM) -> list[tuple[int, int, bool]]:
    """(real tokens, tokens the step ran with, graph replayed) of every step."""
    runner, seen = llm.engine.runner, []
    prepare = runner.prepare

    def wrapped(out, feed=None):
        step = prepare(out, feed)
        seen.append((out.num_tokens, step.layout.num_tokens, step.graph))
        # Eager steps' inputs are normal tensors, like the captured graphs' (prepare runs under
        # inference mode): an inference tensor has other dispatch keys, which Dynamo guards on,
        # so eager steps compiled a second graph (seen with torch 2.11 on CUDA).
        assert not any(t.is_inference() for t in step.inputs.values() if isinstance(t, torch.Tensor))
        return step

    runner.prepare = wrapped
    return seen


def test_bucket_sizes():
    assert bucket_sizes(None, 48) == [2, 4, 8, 16, 32, 48]
    assert bucket_sizes(None, 8192) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert bucket_sizes([1, 3, 100, 9999], 64) == [2, 3, 64]


def _row(rid, stage, tokens, computed, blocks, sample=True, drafts=0, bs=4):
    slots = [blocks[p // bs] * bs + p % bs for p in range(computed, computed + len(tokens))]
    return ScheduledRequest(rid, stage, tokens, computed, blocks, slots, sample, drafts)


def test_pack_pads_every_segment():
    rows = [
        _row("a", Stage.DECODE, [11], 5, [3, 7]),
        _row("b", Stage.VERIFY, [21, 22, 23], 2, [9, 1], drafts=2),
        _row("c", Stage.PREFILL, [31, 32, 33, 34], 0, [4], sample=False),
    ]
    shape = step_shape(rows)
    layout = StepLayout(num_tokens=16, num_seqs=5, num_keep=6, width=3, table_len=0)
    buf = StepBuffer(layout.size, pin=False)
    buf.np[:] = 77  # stale data of an earlier step
    buf.pack(rows, shape, layout, None)
    v = views(buf.host, layout)
    assert v.input_ids.tolist() == [11, 21, 22, 23, 31, 32, 33, 34] + [0] * 8
    assert v.position_ids.tolist() == [5, 2, 3, 4, 0, 1, 2, 3] + [0] * 8
    assert v.slot_mapping.tolist()[:8] == [7 * 4 + 1, 9 * 4 + 2, 9 * 4 + 3, 1 * 4 + 0, 16, 17, 18, 19]
    assert v.slot_mapping.tolist()[8:] == [-1] * 8  # padding rows are never stored
    assert v.cu_seqlens_q.tolist() == [0, 1, 4, 8, 8, 8]  # padding requests own no rows
    assert v.seq_lens.tolist() == [6, 5, 4, 0, 0]
    # one logits row for the decode, drafts + 1 for the verify, none for the unfinished prefill
    assert v.logits_to_keep.tolist() == [0, 1, 2, 3, 0, 0]
    assert shape.num_keep == 4
    assert v.block_table[:3, :2].tolist() == [[3, 7], [9, 1], [4, 77]]


def test_a_step_is_one_upload_unless_a_wide_unused_table_lies_between():
    rows = [_row("a", Stage.DECODE, [11], 5, [3, 7])]
    shape = step_shape(rows)
    small = StepLayout(num_tokens=16, num_seqs=2, num_keep=2, width=3, table_len=64)
    buf = StepBuffer(small.size, pin=False)
    assert buf.used(small, shape, 10, False) == [(0, small.block_table + 3)]  # the hole (54 int32s) is copied
    big_table = StepLayout(num_tokens=16, num_seqs=2, num_keep=2, width=3, table_len=MERGE_GAP + 100)
    assert buf.used(big_table, shape, 10, False) == [(0, big_table.table + 10),
                                                      (big_table.block_table, big_table.block_table + 3)]


def test_wide_block_tables_upload_only_their_used_columns():
    rows = [_row("a", Stage.DECODE, [11], 5, [3, 7]), _row("b", Stage.DECODE, [12], 2, [9])]
    shape = step_shape(rows)  # 2 rows, at most 2 blocks used
    layout = StepLayout(num_tokens=16, num_seqs=4, num_keep=4, width=WIDE_ROWS, table_len=0)
    buf = StepBuffer(layout.size, pin=False)
    buf.pack(rows, shape, layout, None)
    assert buf.wide(layout, shape) and buf.used(layout, shape, 0, True) == [(0, layout.table)]
    flat = torch.full((layout.size,), -5, dtype=torch.int32)  # stands in for the device buffer
    buf.upload(flat, layout, shape, 0)
    table = views(flat, layout).block_table
    assert table[0, :2].tolist() == [3, 7] and table[1, 0].item() == 9
    assert (table[:, 2:] == -5).all() and (table[2:] == -5).all()  # nothing past the used columns
    narrow = StepLayout(num_tokens=16, num_seqs=4, num_keep=4, width=4, table_len=0)
    assert not buf.wide(narrow, shape)


def test_feed_copies_consecutive_rows_or_gathers_and_scatters():
    feed = TokenFeed(8, torch.device("cpu"))
    tokens = torch.tensor([50, 51, 52, 53])
    for dst, src in (([1, 2, 3], [0, 1, 2]), ([0, 2], [3, 1]), ([4], [2])):
        input_ids = torch.zeros(6, dtype=torch.long)
        feed.feed(input_ids, dst, src, tokens)
        expected = torch.zeros(6, dtype=torch.long)
        expected[dst] = tokens[src]
        assert input_ids.tolist() == expected.tolist()


def _coverage(table: np.ndarray) -> dict:
    """(request, kv head, row range) -> the KV positions its tasks read (pieces merged)."""
    start = tiling.HEADER + int(table[0]) + 1
    tasks = table[start:].reshape(-1, tiling.TASK_FIELDS)
    cover: dict = {}
    for t in tasks:
        key = (t[tiling.F_REQUEST], t[tiling.F_ROW_LO], t[tiling.F_ROW_HI], t[tiling.F_KV_HEAD])
        cover.setdefault(key, []).append((int(t[tiling.F_KV_LO]), int(t[tiling.F_KV_HI])))
    return {k: sorted(v) for k, v in cover.items()}


def _union(ranges):
    lo, hi = ranges[0]
    for a, b in ranges[1:]:
        assert a == hi, f"pieces {ranges} leave a gap or overlap"
        hi = b
    return lo, hi


def test_reused_task_table_reads_what_a_fresh_plan_reads():
    tables = TaskTables(num_q_heads=4, num_kv_heads=2, head_dim=16, max_drift=8)
    q = np.array([1, 1, 3, 20])
    stages = ["decode", "decode", "verify", "prefill"]
    kv = np.array([400, 37, 90, 60])  # the 400-token decode is split along KV
    first = tables.table(q, kv, stages, CPU_INTERPRETER).copy()
    assert int(first[2]) > 0  # the plan has split-KV pieces
    for grow in ([1, 1, 1, 1], [5, 0, 2, 8]):
        kv = kv + np.array(grow)
        reused = tables.table(q, kv, stages, CPU_INTERPRETER)
        fresh = tiling.plan(q.tolist(), kv.tolist(), stages, num_q_heads=4, num_kv_heads=2, head_dim=16,
                            profile=CPU_INTERPRETER).tensor().numpy()
        got, want = _coverage(reused), _coverage(fresh)
        assert got.keys() == want.keys()
        assert all(_union(got[k]) == _union(want[k]) for k in got)
    assert tables.num_reused == 2 and tables.num_planned == 1
    tables.table(q, kv + 9, stages, CPU_INTERPRETER)  # grew past max_drift: planned again
    tables.table(q, kv - 1, stages, CPU_INTERPRETER)  # shrank (another request took the row)
    assert tables.num_planned == 3


def test_reused_task_table_runs_the_kernel_exactly():
    torch.manual_seed(0)
    tables = TaskTables(num_q_heads=4, num_kv_heads=2, head_dim=16)
    q_lens, stages, block = np.array([1, 3, 1]), ["decode", "verify", "decode"], 8
    cache_k = torch.randn(64, block, 2, 16)
    cache_v = torch.randn(64, block, 2, 16)
    block_table = torch.arange(60, dtype=torch.int32).view(3, 20)
    for kv in (np.array([130, 40, 9]), np.array([131, 43, 10])):
        table = torch.from_numpy(tables.table(q_lens, kv, stages, CPU_INTERPRETER).copy())
        q = torch.randn(int(q_lens.sum()), 4, 16)
        cu = torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32)
        lens = torch.from_numpy(kv.astype(np.int32))
        got = paged_attention(q, cache_k, cache_v, cu, lens, block_table, 0.25, task_table=table)
        want = ref_kernels.paged_attention(q, cache_k, cache_v, cu, lens, block_table, 0.25)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert tables.num_reused == 1


def test_table_capacity_bounds_every_plan():
    from xy_inductor.engine.model_check import LayerSpec

    spec = LayerSpec(8, 2, 16, 16, torch.float32)
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 12))
        q = rng.integers(1, 40, n)
        kv = q + rng.integers(0, 900, n)
        tokens, seqs = int(q.sum()), n
        table = tiling.plan(q.tolist(), kv.tolist(), num_q_heads=8, num_kv_heads=2, head_dim=16,
                            profile=CPU_INTERPRETER).tensor()
        assert table.numel() <= table_capacity(CPU_INTERPRETER, spec, tokens, seqs)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_padded_buckets_match_hf_and_unpadded(impl):
    lengths = LENGTHS if impl == "reference" else [1, 40, 7, 19]  # the interpreter is slow
    prompts = random_prompts(lengths)
    expected = reference("llama", tuple(map(tuple, prompts)), NEW)
    model = build_model("llama")
    # buckets up to 32 with a budget of 48: full prefill steps run eagerly, the rest padded
    llm = LLM(model, max_num_batched_tokens=48, max_num_seqs=8, compile=False, impl=impl, cuda_graphs=True,
              cuda_graph_sizes=[2, 4, 8, 16, 32])
    seen = record_layouts(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert any(real < ran <= 32 for real, ran, _ in seen)  # virtually padded steps
    assert any(ran > 32 for _, ran, _ in seen)  # the eager fallback
    assert llm.stats["cuda_graphs"] is False  # no capture on CPU
    if impl == "triton":
        assert llm.stats["task_tables_reused"] > 0


def test_padded_buckets_keep_verify_rows():
    model = build_model("llama")
    prompts = random_prompts([5, 90, 12, 40])
    prompts = [p[:6] * (len(p) // 6) + p[: len(p) % 6] if i % 2 else p for i, p in enumerate(prompts)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = LLM(model, max_num_batched_tokens=64, max_num_seqs=4, compile=False).generate(prompts, params, use_tqdm=False)
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = LLM(model, max_num_batched_tokens=64, max_num_seqs=4, compile=False, cuda_graphs=True, speculative=spec)
    seen = record_layouts(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert llm.stats["spec_draft_tokens"] > 0
    assert any(real < ran for real, ran, _ in seen)


# ------------------------------------------------------------------ GPU: real graphs
def _gpu_llm(model, graphs: bool, **kw):
    # buckets up to 64 with a budget of 128: the biggest prefill steps run eagerly
    return LLM(model, max_num_batched_tokens=128, max_num_seqs=16, cuda_graphs=graphs,
               cuda_graph_sizes=[2, 4, 8, 16, 32, 64], **kw)


def _hf_on(model, prompts, new):
    """HF generate on the same device (the GPU's fp32 numerics, not the CPU's)."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_graphs_equal_eager_equal_hf_on_gpu(compile):
    prompts = random_prompts(LENGTHS)
    model = build_model("llama").cuda()
    expected = _hf_on(model, prompts, NEW)
    # in-order steps without graphs vs overlapped steps (the CUDA default) with graphs
    eager = _gpu_llm(model, False, compile=compile, async_scheduling=False).generate(prompts, GREEDY, use_tqdm=False)
    llm = _gpu_llm(model, True, compile=compile)
    seen = record_layouts(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    stats = llm.stats
    assert stats["cuda_graphs"] and "cuda_graph_error" not in stats, stats
    assert [o.token_ids for o in eager] == expected
    assert [o.token_ids for o in outs] == expected
    assert stats["cuda_graph_replays"] == sum(g for *_, g in seen) > 0
    assert any(not g for *_, g in seen)  # steps of 65-128 tokens: bigger than the buckets
    assert any(real < ran for real, ran, g in seen if g)  # replays of virtually padded steps
    assert stats["cuda_graph_capture_s"] > 0
    assert stats["overlapped_steps"] == stats["steps"] > 0  # the sampled tokens fed on the device


@pytest.mark.gpu
def test_graphs_with_wide_block_tables_equal_hf_on_gpu(monkeypatch):
    from xy_inductor.engine import step_buffer

    monkeypatch.setattr(step_buffer, "WIDE_ROWS", 8)  # every graph step uploads only its rows' used columns
    prompts = random_prompts(LENGTHS)
    model = build_model("llama").cuda()
    expected = _hf_on(model, prompts, NEW)  # before the engine owns the model
    llm = _gpu_llm(model, True, compile=False)
    seen = record_layouts(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert sum(g for *_, g in seen) > 0  # graph replays, whose block tables went up column-wise


@pytest.mark.gpu
def test_graphs_with_speculative_verify_rows_on_gpu():
    model = build_model("llama").cuda()
    prompts = random_prompts([5, 90, 12, 40, 3, 70])
    prompts = [p[:6] * (len(p) // 6) + p[: len(p) % 6] if i % 2 else p for i, p in enumerate(prompts)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = _gpu_llm(model, False, compile=False).generate(prompts, params, use_tqdm=False)
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = _gpu_llm(model, True, compile=False, speculative=spec)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert llm.stats["cuda_graph_replays"] > 0 and llm.stats["spec_draft_tokens"] > 0


@pytest.mark.gpu
def test_graphs_mix_greedy_and_sampled_rows_on_gpu():
    """Greedy rows take the graph's own argmax; a sampled row beside them is drawn from its logits."""
    model = build_model("llama").cuda()
    prompts = random_prompts([7, 30, 12, 50])
    expected = _hf_on(model, [p for i, p in enumerate(prompts) if i % 2 == 0], NEW)  # before the engine owns it
    llm = _gpu_llm(model, True, compile=False)
    sampled = SamplingParams(temperature=1.0, top_k=5, max_tokens=NEW, ignore_eos=True, seed=3)
    params = [GREEDY if i % 2 == 0 else sampled for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.runner.last_argmax is not None  # the runner computed the argmax on the device
    assert [o.token_ids for i, o in enumerate(outs) if i % 2 == 0] == expected
    assert all(len(o.token_ids) == NEW for o in outs) and llm.stats["cuda_graph_replays"] > 0
