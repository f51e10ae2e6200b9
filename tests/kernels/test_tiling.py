"""The Task-Table planner: tiles per stage, coverage, symmetric round robin, split-KV, profiles."""
import random

import numpy as np
import pytest
import torch

from ascend_kernels import profiles
from ascend_kernels.tiling import (HEADER, PATH_LARGE, PATH_SMALL, TASK_FIELDS, build_task_table, plan,
                                   symmetric_round_robin)

H100 = profiles.H100


def mixed_batch(rng):
    """The DESIGN.md mix: 4 chunked prefills of 512 on 0.5-2.5k prefixes, 48 decodes, 4 verifies of 5."""
    q_lens, kv_lens, stages = [], [], []
    for _ in range(4):
        q_lens.append(512), kv_lens.append(512 + rng.randint(512, 2560)), stages.append("prefill")
    for _ in range(48):
        q_lens.append(1), kv_lens.append(rng.randint(512, 4096)), stages.append("decode")
    for _ in range(4):
        q_lens.append(5), kv_lens.append(rng.randint(512, 4096)), stages.append("verify")
    return q_lens, kv_lens, stages


def test_symmetric_round_robin_order():
    costs = np.array([30, 80, 10, 70, 60, 50, 40, 20])
    order, starts = symmetric_round_robin(costs, 4)
    dealt = [costs[order[a:b]].tolist() for a, b in zip(starts[:-1], starts[1:])]
    assert dealt == [[80, 10], [70, 20], [60, 30], [50, 40]]  # 0,1,2,3 then 3,2,1,0
    order, starts = symmetric_round_robin(np.arange(12, 0, -1), 4)
    assert [len(order[a:b]) for a, b in zip(starts[:-1], starts[1:])] == [3, 3, 3, 3]
    assert sorted(order.tolist()) == list(range(12))


def test_round_robin_balances_the_mixed_batch():
    q_lens, kv_lens, stages = mixed_batch(random.Random(0))
    p = plan(q_lens, kv_lens, stages, num_q_heads=32, num_kv_heads=8, head_dim=128, profile=H100)
    mean = sum(p.loads) / len(p.loads)
    assert max(p.loads) / mean < 1.15, f"imbalance {max(p.loads) / mean:.3f}"
    # a plain (non-symmetric) deal of the same sorted tasks is never better balanced
    plain = [0] * p.num_programs
    for i, t in enumerate(sorted(p.tasks, key=lambda t: -t.cost)):
        plain[i % p.num_programs] += t.cost
    assert max(p.loads) <= max(plain)


def covered(p, group):
    """(request, row, kv_head) -> list of KV ranges, from every task of a plan."""
    seen = {}
    for t in p.tasks:
        for row in range(t.row_lo, t.row_hi):
            seen.setdefault((t.request, row, t.kv_head), []).append((t.kv_lo, t.kv_hi))
    return seen


@pytest.mark.parametrize("seed", range(4))
def test_every_row_and_kv_position_once(seed):
    rng = random.Random(seed)
    num_kv, group = rng.choice([(1, 1), (2, 4), (1, 8), (4, 2)])
    q_lens = [rng.choice([0, 1, 1, 3, 5, rng.randint(6, 300)]) for _ in range(rng.randint(1, 12))]
    kv_lens = [q + rng.randint(0, 3000) for q in q_lens]
    for prof in (profiles.CPU_INTERPRETER, H100, profiles.ASCEND_910B):
        p = plan(q_lens, kv_lens, num_q_heads=num_kv * group, num_kv_heads=num_kv, head_dim=128, profile=prof)
        seen = covered(p, group)
        tiles = prof.attention_tiles(128)
        assert all(t.row_hi - t.row_lo <= (tiles.small_rows if t.path == PATH_SMALL else tiles.large_rows)
                   for t in p.tasks)
        for b, (q, kv) in enumerate(zip(q_lens, kv_lens)):
            for row in range(q * group):
                for h in range(num_kv):
                    ranges = sorted(seen.pop((b, row, h)))
                    # split pieces tile [0, end) without gaps or overlaps; end covers the row's token
                    assert ranges[0][0] == 0 and all(a[1] == c[0] for a, c in zip(ranges, ranges[1:]))
                    assert kv - q + row // group < ranges[-1][1] <= kv
        assert not seen, "tasks for rows that do not exist"
        assert p.num_partials <= prof.max_partials
        assert sum(len(x) for x in p.programs) == len(p.tasks)


def test_tile_rows_per_stage():
    p = plan([1, 5, 200], [900, 300, 700], ["decode", "verify", "prefill"], num_q_heads=32, num_kv_heads=8,
             head_dim=128, profile=H100, split_kv=False)
    by_request = {b: [t for t in p.tasks if t.request == b and t.kv_head == 0] for b in range(3)}
    assert [(t.path, t.row_hi - t.row_lo) for t in by_request[0]] == [(PATH_SMALL, 4)]  # group packed in a row tile
    assert [(t.path, t.row_hi - t.row_lo) for t in by_request[1]] == [(PATH_LARGE, 20)]  # verify: one tile
    prefill = sorted(by_request[2], key=lambda t: t.row_lo)
    assert all(t.path == PATH_LARGE and t.row_lo % 4 == 0 for t in prefill)  # whole tokens per tile
    assert sum(t.row_hi - t.row_lo for t in prefill) == 800 and len(prefill) == 7
    assert prefill[0].kv_hi == 700 - 200 + 32  # causal: the first tile reads only up to its last token


def test_long_decodes_split_when_tasks_are_few():
    p = plan([1], [4096], num_q_heads=32, num_kv_heads=8, head_dim=128, profile=H100)
    assert len(p.tasks) > 8 and p.num_partials == len(p.tasks)
    assert all(t.num_splits > 1 and t.path == PATH_SMALL for t in p.tasks)
    unsplit = plan([1], [4096], num_q_heads=32, num_kv_heads=8, head_dim=128, profile=H100, split_kv=False)
    assert max(p.loads) < max(unsplit.loads) / 4


def test_table_layout_for_the_engine():
    table = build_task_table([3, 1], [10, 40], num_q_heads=4, num_kv_heads=2, head_dim=64, device="cpu")
    p = plan([3, 1], [10, 40], num_q_heads=4, num_kv_heads=2, head_dim=64, profile=profiles.CPU_INTERPRETER)
    assert table.dtype == torch.int32 and torch.equal(table, p.tensor())
    num_programs, num_tasks, _, fields, _ = table[:HEADER].tolist()
    assert fields == TASK_FIELDS and num_programs == p.num_programs
    starts = table[HEADER:HEADER + num_programs + 1].tolist()
    assert starts[0] == 0 and starts[-1] == num_tasks == len(p.tasks)
    body = table[HEADER + num_programs + 1:].view(num_tasks, TASK_FIELDS)
    assert body.tolist() == [t.fields() for t in p.tasks]
    # every task carries its request's first packed row, query length and KV length
    cu, q_lens, kv_lens = [0, 3], [3, 1], [10, 40]
    assert all((t.q_row0, t.q_len, t.seq_len) == (cu[t.request], q_lens[t.request], kv_lens[t.request])
               for t in p.tasks)


def test_naive_schedule_is_one_program_per_task():
    p = plan([40, 1], [40, 90], num_q_heads=4, num_kv_heads=2, head_dim=64,
             profile=profiles.CPU_INTERPRETER, schedule="naive")
    assert p.num_programs == len(p.tasks) and all(len(x) == 1 for x in p.programs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        plan([1], [10], num_q_heads=6, num_kv_heads=4, head_dim=64, profile=H100)
    with pytest.raises(ValueError):
        plan([5], [3], num_q_heads=4, num_kv_heads=4, head_dim=64, profile=H100)
    with pytest.raises(ValueError):
        plan([1], [3], ["chunk"], num_q_heads=4, num_kv_heads=4, head_dim=64, profile=H100)


def test_profiles():
    ascend = profiles.ASCEND_910B
    assert not ascend.tested and ascend.num_programs == 24
    for d in (64, 80, 96, 128, 256):
        tiles = ascend.attention_tiles(d)
        ascend.check_fits(tiles, d, elem_bytes=2)
        assert tiles.large_rows % 16 == 0 and tiles.kv_tile % 16 == 0  # whole 16x16 cube fractals
    with pytest.raises(ValueError):
        ascend.check_fits(profiles.AttentionTiles(16, 256, 256, 4, 2), 256, elem_bytes=2)
    with pytest.raises(ValueError):
        profiles.TargetProfile(name="bad", num_cores=4, kv_tile=48)
    assert H100.attention_tiles(256).large_rows < H100.attention_tiles(128).large_rows
    assert profiles.profile_for("cpu") is profiles.CPU_INTERPRETER


def test_variant_follows_tokens_per_request():
    decode = H100.for_batch(num_tokens=64, num_requests=64)
    mixed = H100.for_batch(num_tokens=2116, num_requests=56)
    assert mixed is H100 and decode.num_warps == 4 and decode.num_programs == 2 * H100.num_programs
    assert decode.max_partials == H100.max_partials  # one workspace size serves both variants
    p = plan([1] * 64, [1000] * 64, num_q_heads=32, num_kv_heads=8, head_dim=128, profile=H100)
    assert p.num_programs == decode.num_programs and p.tiles == decode.attention_tiles(128)
