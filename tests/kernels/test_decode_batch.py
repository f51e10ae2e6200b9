"""Decode batches: the Task-Table's header marks them and the kernel maps programs to (request, kv
head) pairs itself instead of walking tasks (tiling.plan, attention_kernel._pair_kv and _attend_tile)."""
import dataclasses
import math

import pytest
import torch

from ascend_kernels import attention, reference
from ascend_kernels.profiles import CPU_INTERPRETER
from ascend_kernels.tiling import F_DECODE_REQUESTS, plan
from tests.kernels.test_attention import assert_close, fp64_paged, paged_batch

MEMORY = CPU_INTERPRETER.for_batch(1, 1)  # the variant decode batches run: 8 programs here


def decode_flag(q_lens, kv_lens, *, heads=4, kv_heads=2, causal="bottom_right", split_kv=True):
    p = plan(q_lens, kv_lens, num_q_heads=heads, num_kv_heads=kv_heads, head_dim=64, profile=CPU_INTERPRETER,
             causal=causal, split_kv=split_kv)
    assert int(p.tensor()[F_DECODE_REQUESTS]) == p.decode_requests
    return p.decode_requests


def test_the_planner_marks_only_whole_kv_decodes_that_fit_the_grid():
    assert decode_flag([1, 1, 1], [5, 20, 31]) == 3
    assert decode_flag([1, 2], [5, 9]) == 0, "a verify row is not a decode"
    assert decode_flag([1, 0], [5, 9]) == 0, "an idle request breaks the one-row-per-request packing"
    assert decode_flag([1, 1], [5, 9], causal="top_left") == 0, "top-left causal shows a lone token position 0 only"
    assert decode_flag([1, 1], [5, 9], causal="none") == 2
    assert decode_flag([1] * 5, [20] * 5) == 0, "10 pairs on 8 programs"
    assert decode_flag([1], [20], heads=64, kv_heads=2) == 0, "a group of 32 rows spans two 16-row tiles"
    assert decode_flag([1], [300], kv_heads=1, heads=8) == 0, "one long decode (1 pair for 4 cores) splits along KV"
    assert decode_flag([1], [300], kv_heads=1, heads=8, split_kv=False) == 1
    assert decode_flag([1, 1], [300, 200], kv_heads=1, heads=8) == 2, "pairs for half the cores stay whole"
    assert decode_flag([1] * 4, [300, 10, 10, 10], kv_heads=1, heads=8) == 0, "one long KV among short ones splits"


def run_decode(specs, *, grid=None, table_width=None, group=2, num_kv_heads=2, pad_rows=3, dtype=torch.float32,
               profile=MEMORY):
    gen = torch.Generator().manual_seed(sum(kv for _, kv in specs))
    heads, head_dim = group * num_kv_heads, 64
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                          block_size=16, dtype=dtype, pad_rows=pad_rows)
    if table_width is not None:  # extra block-table columns (never read) or exactly the used ones
        wide = torch.full((bt.shape[0], table_width), 10**6, dtype=torch.int32)
        wide[:, :bt.shape[1]] = bt
        bt = wide
    p = plan([s[0] for s in specs], [s[1] for s in specs], num_q_heads=heads, num_kv_heads=num_kv_heads,
             head_dim=head_dim, profile=CPU_INTERPRETER, split_kv=False)  # the interpreter's profile splits at 32
    assert p.decode_requests == len(specs)
    ops = attention.Operands(block_table=bt, cu_seqlens_q=cu, tree=q.new_empty(0, dtype=torch.uint8),
                             mask=q.new_empty(0), mask_kind=0, paged=True, causal=True, num_requests=len(specs),
                             seq_lens=lens)
    scale = 1 / math.sqrt(head_dim)
    out = attention.launch(q, kc, vc, torch.full_like(q, float("nan")), p.tensor(), ops, scale,
                           tiles=profile.attention_tiles(head_dim), profile=profile, grid=grid)
    real = int(cu[-1])
    assert (out[real:] == 0).all(), "padding rows past the last request must be zero"
    want = fp64_paged(q, kc, vc, cu, lens, bt, scale)
    assert_close(out[:real], want[:real], dtype, f"decode batch {specs}")
    assert_close(out[:real], reference.paged_attention(q, kc, vc, cu, lens, bt, scale)[:real], dtype, "vs reference")


@pytest.mark.parametrize("grid", [None, 3, 1])
def test_decode_batch_matches_fp64_on_any_grid(grid):
    """8 programs take a pair each; 3 or 1 program walk several pairs (loading each pair's KV
    length and block-table entries themselves); KV lengths cross the 48-position chunks."""
    run_decode([(1, 1), (1, 47), (1, 130), (1, 64)], grid=grid)


@pytest.mark.parametrize("width", [9, 40])
def test_block_tables_narrower_or_wider_than_a_chunk(width):
    """The first entries are loaded before the KV length is known: only the table's own columns
    are read, and entries past a request's pages never reach a K/V address."""
    run_decode([(1, 120), (1, 17)], table_width=width)


def test_a_decode_tile_wider_than_the_small_paths():
    """GH100 profiles give decode batches their own (wider) KV tile and chunk: 64 here against 16."""
    profile = dataclasses.replace(MEMORY, decode_kv_tile=64)
    assert profile.attention_tiles(64).decode_kv_tile == 64 and profile.attention_tiles(64).small_kv_tile == 16
    run_decode([(1, 1), (1, 63), (1, 130), (1, 65)], profile=profile)
    run_decode([(1, 129), (1, 200)], profile=profile, grid=1)


def test_group_of_sixteen_rows_and_bf16():
    run_decode([(1, 33), (1, 100)], group=16, num_kv_heads=1, dtype=torch.bfloat16)


def test_custom_op_runs_decode_batches():
    """The engine's path: a prebuilt decode table through xyserve::paged_attention."""
    import lowering.ops  # noqa: F401

    gen = torch.Generator().manual_seed(4)
    specs = [(1, 20), (1, 70), (1, 5)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                                          dtype=torch.float32)
    table = plan([1, 1, 1], [20, 70, 5], num_q_heads=8, num_kv_heads=2, head_dim=64, profile=CPU_INTERPRETER,
                 split_kv=False)
    assert table.decode_requests == 3
    out = torch.ops.xyserve.paged_attention(q, kc, vc, cu, lens, bt, 0.125, None, table.tensor(), "triton")
    assert_close(out, fp64_paged(q, kc, vc, cu, lens, bt, 0.125), torch.float32, "xyserve::paged_attention")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 128), (torch.float16, 256),
                                            (torch.bfloat16, 80)])
def test_decode_batches_on_the_gpu(dtype, head_dim):
    """Enough decodes to fill half the SMs run as a decode batch on a GPU (its own KV tile,
    narrowed for wide rows), long ones kept whole; padding rows zero."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from ascend_kernels.profiles import profile_for

    gen = torch.Generator().manual_seed(head_dim)
    specs = [(1, 1 + (37 * i) % 900) for i in range(40)]
    batch = paged_batch(gen, specs, num_heads=8, num_kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype,
                        pad_rows=5)
    scale = head_dim ** -0.5
    want = fp64_paged(*batch, scale)
    q, kc, vc, cu, lens, bt = (t.cuda() for t in batch)
    p = plan([1] * 40, [kv for _, kv in specs], num_q_heads=8, num_kv_heads=2, head_dim=head_dim,
             profile=profile_for(q.device))
    assert p.decode_requests == 40
    out = attention.paged_attention(q, kc, vc, cu, lens, bt, scale, None, p.tensor().cuda(),
                                    out=torch.full_like(q, float("nan")))
    assert (out[40:] == 0).all()
    assert_close(out[:40].cpu(), want[:40], dtype, f"decode batch {dtype} {head_dim}")
