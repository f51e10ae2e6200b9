"""Hopper prefill path: its task list and dispatch rules (CPU), its Gluon kernel (sm_90 GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ascend_kernels import attention, prefill_hopper
from tests.kernels.test_attention import assert_close, fp64_paged, paged_batch
from tests.sm90 import is_sm90


def _cost(row, q_lens, kv_lens, block_m=128):
    b, m0, _ = row
    return min(kv_lens[b], kv_lens[b] - q_lens[b] + m0 + block_m)


@pytest.mark.parametrize("q_lens,kv_lens,heads,group,grid", [
    ([2048] * 4, [2048] * 4, 32, 4, 132), ([300, 128, 1000], [300, 900, 2077], 8, 1, 7), ([129], [129], 2, 2, 16),
])
def test_task_rows_cover_every_tile_once_heaviest_first_in_symmetric_round_robin(q_lens, kv_lens, heads, group, grid):
    rows = prefill_hopper.task_rows(q_lens, kv_lens, heads, group, 128, grid)
    assert len(rows) % grid == 0
    tasks = [r for r in rows if r[0] >= 0]
    want = {(b, m0, h) for b, n in enumerate(q_lens) for m0 in range(0, n, 128) for h in range(heads)}
    assert sorted(tasks) == sorted(want)  # every tile once
    assert all(r == (-1, 0, 0) for r in rows[len(rows) - grid:] if r[0] < 0)  # holes only in the last round
    assert all(r[0] >= 0 for r in rows[:len(rows) - grid])
    # the order tasks were dealt in (round by round, snake order) is non-increasing in cost
    dealt = []
    for rnd in range(len(rows) // grid):
        part = rows[rnd * grid:(rnd + 1) * grid]
        dealt += [r for r in (part if rnd % 2 == 0 else part[::-1]) if r[0] >= 0]
    costs = [_cost(r, q_lens, kv_lens) for r in dealt]
    assert costs == sorted(costs, reverse=True)
    # symmetric round robin: programs' total costs differ by at most one heaviest task
    load = [sum(_cost(r, q_lens, kv_lens) for r in rows[p::grid] if r[0] >= 0) for p in range(grid)]
    assert max(load) - min(load) <= max(costs)


def test_problem_names_why_a_batch_stays_on_the_meta_kernel():
    q, kc, vc = torch.zeros(300, 8, 128), torch.zeros(20, 16, 2, 128), torch.zeros(20, 16, 2, 128)
    assert "sm_90" in prefill_hopper.problem(q, kc, vc, [300])


def test_a_failing_launch_warns_once_and_hands_the_batch_back(monkeypatch):
    """A Triton whose Gluon API moved fails at compile time: the caller must get None (its meta-kernel
    runs) and a warning, and later batches must not retry."""
    monkeypatch.setattr(prefill_hopper, "_failed", [])
    monkeypatch.setattr(prefill_hopper, "_is_sm90", lambda index: True)
    monkeypatch.setattr(prefill_hopper, "_gluon_kernel", lambda: None)

    def broken(*args, **kwargs):
        raise RuntimeError("async_copy_global_to_shared has been removed")
    monkeypatch.setattr(prefill_hopper, "HopperPrefill", broken)
    q = torch.zeros(256, 8, 128, dtype=torch.bfloat16)
    # CPU tensors stand in for GPU ones
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    kc = torch.zeros(16, 16, 2, 128, dtype=torch.bfloat16)
    args = (q, kc, kc.clone(), torch.tensor([0, 256]), torch.tensor([256]), torch.zeros(1, 16, dtype=torch.int32), 0.1)
    with pytest.warns(UserWarning, match="Gluon prefill kernel failed"):
        assert prefill_hopper.try_run(*args, [256]) is None
    assert "failed" in prefill_hopper.problem(q, kc, kc, [256])  # switched off from now on


def test_config_is_checked():
    with pytest.raises(ValueError):
        prefill_hopper.HopperPrefillConfig(block_m=64)
    with pytest.raises(ValueError):
        prefill_hopper.HopperPrefillConfig(num_buf=1)
    assert prefill_hopper.HopperPrefillConfig().smem_bytes(128, 2) <= prefill_hopper.SMEM_BYTES


@pytest.mark.parametrize("head_dim,page,dtype", [(128, 16, "bf16"), (64, 32, "fp16")])
def test_gluon_kernel_compiles_for_sm90_without_a_gpu(head_dim, page, dtype):
    """Catches Gluon API drift in the installed Triton (the kernel only runs on Hopper GPUs): compile it
    for sm_90 as a launch would, in a process without the CPU interpreter (it rewrites tl functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.kernels.compile_gluon_sm90", str(head_dim), str(page), dtype],
                         env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["tma"] and report["wgmma"] and report["setmaxnreg"], report
    assert report["shared"] <= prefill_hopper.SMEM_BYTES


@pytest.mark.gpu
@pytest.mark.parametrize("specs,heads,kv_heads,head_dim,page,dtype", [
    ([(2048, 2048), (300, 300)], 32, 8, 128, 16, torch.bfloat16),  # prefill, causal from position 0
    ([(512, 1500), (128, 1000), (200, 333)], 32, 8, 128, 16, torch.bfloat16),  # chunked prefill on a prefix
    ([(129, 129), (256, 700)], 8, 8, 64, 32, torch.float16),  # MHA, head dim 64
    ([(300, 777)], 16, 2, 128, 64, torch.float16),  # GQA 8, page 64
    ([(400, 400)], 4, 4, 128, 128, torch.bfloat16),  # page 128 = one KV tile
])
def test_gluon_prefill_matches_fp64_and_ignores_nan_in_unused_cache_slots(specs, heads, kv_heads, head_dim, page,
                                                                          dtype):
    if not is_sm90():
        pytest.skip("needs an sm_90 GPU")
    gen = torch.Generator().manual_seed(7)
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                          block_size=page, dtype=dtype)
    # slots past each request's KV length (its last page's tail, spare blocks) hold NaN: they must not leak
    used = torch.zeros(kc.shape[0], page, dtype=torch.bool)
    for b, (_, kv) in enumerate(specs):
        for j in range(kv):
            used[bt[b, j // page], j % page] = True
    kc[~used], vc[~used] = float("nan"), float("nan")
    scale = head_dim ** -0.5
    ref = fp64_paged(q, kc.nan_to_num(), vc.nan_to_num(), cu, lens, bt, scale)
    q, kc, vc, cu, lens, bt = (t.cuda() for t in (q, kc, vc, cu, lens, bt))
    assert prefill_hopper.problem(q, kc, vc, [n for n, _ in specs]) is None  # this batch takes the Gluon path
    out = attention.paged_attention(q, kc, vc, cu, lens, bt, scale, out=torch.full_like(q, float("nan")))
    assert_close(out.cpu(), ref, dtype, f"gluon prefill {specs}")
