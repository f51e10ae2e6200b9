"""Token-Table -> Task-Table: the meta-attention planner (host side, numpy).

A request (a Token-Table row: q_len new tokens, kv_len cached + new positions, a stage) is cut
into query tiles of *rows*, one row per (query token, query head of a GQA group), so one task
reads the K/V of one kv head once for its whole group. Tiles x kv heads are the tasks. Tasks
are sorted by cost (tile rows x KV positions read) and dealt to a fixed number of persistent
programs in symmetric round robin (0,1,..,P-1,P-1,..,1,0,...) so every program gets a similar
mix of large and small tasks. When a small-path task (decode, short verify) outweighs a share
of a program's work, it is split along the KV axis; the kernel merges the pieces.

The table is one int32 tensor the kernel walks (all offsets in int32 elements):

    [0:HEADER]              num_programs, num_tasks, num_partials, TASK_FIELDS, decode_requests
    [HEADER:HEADER+P+1]     first task of each program (prefix sums)
    [HEADER+P+1:]           tasks, TASK_FIELDS each (see the F_* names)

decode_requests > 0 marks a batch of that many one-token decodes whose tasks are exactly one per
(request, kv head) over the whole KV: the kernel then maps programs to (request, kv head) pairs
itself and skips the task walk (two dependent loads fewer before the K/V, see the kernel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ascend_kernels.profiles import AttentionTiles, TargetProfile, profile_for

HEADER = 5
F_DECODE_REQUESTS = 4  # header field: see the module docstring
(F_REQUEST, F_ROW_LO, F_ROW_HI, F_KV_HEAD, F_KV_LO, F_KV_HI, F_PATH, F_PART_BASE, F_SPLIT, F_NUM_SPLITS,
 F_Q_ROW0, F_Q_LEN, F_SEQ_LEN) = range(13)
# The last three repeat the request's packed first row, query length and KV length, so the kernel
# reads a task in one go instead of following it to cu_seqlens_q / seq_lens (one dependent load
# fewer before the K/V loads of a decode).
TASK_FIELDS = 13
PATH_SMALL, PATH_LARGE = 0, 1
STAGES = ("prefill", "decode", "verify")
CAUSAL_MODES = ("bottom_right", "top_left", "none")


@dataclass(slots=True, frozen=True)
class Task:
    """One (request, query-row tile, kv head, KV range) unit of work (a readable table row)."""

    request: int
    row_lo: int  # rows are token * group + head-in-group, counted inside the request
    row_hi: int
    kv_head: int
    kv_lo: int
    kv_hi: int
    path: int
    part_base: int = -1  # first merge-workspace slot of a split task's pieces, -1 if not split
    split: int = 0
    num_splits: int = 1
    q_row0: int = 0  # the request's first packed query row (cu_seqlens_q[request])
    q_len: int = 0  # the request's new tokens
    seq_len: int = 0  # the request's KV length, new tokens included
    cost: int = 0

    def fields(self) -> list[int]:
        return [self.request, self.row_lo, self.row_hi, self.kv_head, self.kv_lo, self.kv_hi,
                self.path, self.part_base, self.split, self.num_splits, self.q_row0, self.q_len, self.seq_len]


@dataclass(slots=True)
class TaskPlan:
    """rows: [num_tasks, TASK_FIELDS] int64 in program order; starts: [P + 1] prefix sums."""

    num_programs: int
    rows: np.ndarray
    costs: np.ndarray
    starts: np.ndarray
    num_partials: int
    tiles: AttentionTiles
    decode_requests: int = 0

    @property
    def loads(self) -> list[int]:
        return [int(self.costs[a:b].sum()) for a, b in zip(self.starts[:-1], self.starts[1:])]

    @property
    def programs(self) -> list[list[Task]]:
        return [[Task(*map(int, self.rows[i]), cost=int(self.costs[i])) for i in range(a, b)]
                for a, b in zip(self.starts[:-1], self.starts[1:])]

    @property
    def tasks(self) -> list[Task]:
        return [t for tasks in self.programs for t in tasks]

    def tensor(self) -> torch.Tensor:
        """The compact int32 Task-Table (on the host; move it to the device once per step)."""
        header = np.array([self.num_programs, len(self.rows), self.num_partials, TASK_FIELDS, self.decode_requests])
        flat = np.concatenate([header, self.starts, self.rows.reshape(-1)]).astype(np.int32)
        return torch.from_numpy(flat)


def request_tiles(q_lens: np.ndarray, kv_lens: np.ndarray, stages: np.ndarray, group: int,
                  tiles: AttentionTiles, causal: str) -> np.ndarray:
    """[tiles, 8] for all requests at once: request, row_lo, row_hi, kv_lo, kv_hi, path, padded
    rows (BLOCK_M), BLOCK_N. `stages` holds indices into STAGES.

    Decode packs the group's heads into one small tile, a verify takes one tile (small when it
    fits), prefill takes large tiles of whole tokens.
    """
    rows = q_lens * group
    small = (stages == STAGES.index("decode")) | ((stages == STAGES.index("verify")) & (rows <= tiles.small_rows))
    large_step = tiles.large_rows // group * group if group <= tiles.large_rows else tiles.large_rows
    step = np.where(small, tiles.small_rows, large_step)
    count = -(-rows // step)
    req = np.repeat(np.arange(len(rows)), count)
    first = np.repeat(np.cumsum(count) - count, count)
    row_lo = (np.arange(len(req)) - first) * step[req]
    row_hi = np.minimum(row_lo + step[req], rows[req])
    last_token = (row_hi - 1) // group
    q_len, kv_len = q_lens[req], kv_lens[req]
    if causal == "bottom_right":  # token i sits at kv_len - q_len + i
        kv_hi = np.minimum(kv_len, kv_len - q_len + last_token + 1)
    elif causal == "top_left":  # SDPA's is_causal: token i sits at i
        kv_hi = np.minimum(kv_len, last_token + 1)
    else:
        kv_hi = kv_len
    is_small = small[req]
    return np.stack([req, row_lo, row_hi, np.zeros_like(req), kv_hi,
                     np.where(is_small, PATH_SMALL, PATH_LARGE),
                     np.where(is_small, tiles.small_rows, tiles.large_rows),
                     np.where(is_small, tiles.small_kv_tile, tiles.kv_tile)], 1).astype(np.int64)


def split_long_tasks(rows: np.ndarray, costs: np.ndarray, num_programs: int, tiles: AttentionTiles,
                     profile: TargetProfile) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut small-path tasks that outweigh a fraction of a program's fair share along KV."""
    piece_cost = max(1, int(costs.sum()) // (num_programs * profile.split_pieces_per_program))
    span = rows[:, F_KV_HI] - rows[:, F_KV_LO]
    pieces = np.minimum.reduce([np.full_like(span, profile.max_splits), -(-costs // piece_cost),
                                span // profile.min_split_kv])
    pieces[(rows[:, F_PATH] != PATH_SMALL) | (rows[:, F_ROW_HI] - rows[:, F_ROW_LO] > tiles.small_rows)] = 1
    chunk = -(-span // np.maximum(pieces, 1))
    chunk = -(-chunk // tiles.small_kv_tile) * tiles.small_kv_tile  # whole KV tiles per piece
    pieces = np.where(pieces >= 2, -(-span // np.maximum(chunk, 1)), 1)
    # the largest tasks split first while the workspace budget lasts
    order = np.argsort(-costs, kind="stable")
    fits = np.cumsum(np.where(pieces[order] >= 2, pieces[order], 0)) <= profile.max_partials
    pieces[order[~fits]] = 1
    split = pieces >= 2
    if not split.any():
        return rows, costs, 0
    counts = pieces[split]
    idx = np.repeat(np.flatnonzero(split), counts)
    piece = np.arange(len(idx)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = rows[idx].copy()
    out[:, F_KV_LO] = rows[idx, F_KV_LO] + piece * chunk[idx]
    out[:, F_KV_HI] = np.minimum(out[:, F_KV_LO] + chunk[idx], rows[idx, F_KV_HI])
    out[:, F_PART_BASE] = np.repeat(np.cumsum(counts) - counts, counts)
    out[:, F_SPLIT] = piece
    out[:, F_NUM_SPLITS] = np.repeat(counts, counts)
    out_cost = tiles.small_rows * (out[:, F_KV_HI] - out[:, F_KV_LO] + 2 * tiles.small_kv_tile)
    return (np.concatenate([rows[~split], out]), np.concatenate([costs[~split], out_cost]), int(counts.sum()))


def symmetric_round_robin(costs: np.ndarray, num_programs: int) -> tuple[np.ndarray, np.ndarray]:
    """(task order, program starts): largest first, dealt 0..P-1 then P-1..0, and so on."""
    order = np.argsort(-np.asarray(costs), kind="stable")
    lap, j = np.divmod(np.arange(len(order)), num_programs)
    program = np.where(lap % 2 == 0, j, num_programs - 1 - j)
    by_program = np.argsort(program, kind="stable")  # keeps each program's tasks largest first
    starts = np.concatenate([[0], np.cumsum(np.bincount(program, minlength=num_programs))])
    return order[by_program], starts


def plan(q_lens: Sequence[int], kv_lens: Sequence[int], stages: Sequence[str] | None = None, *,
         num_q_heads: int, num_kv_heads: int, head_dim: int, profile: TargetProfile,
         causal: str = "bottom_right", split_kv: bool = True, schedule: str = "symmetric") -> TaskPlan:
    """Build the Task-Table of one batch for `profile.for_batch(...)`, the variant the launcher runs.

    causal:   "bottom_right" (paged attention: new tokens at the end of the KV), "top_left" (SDPA
              is_causal) or "none" (no causal limit: tree masks, explicit dense masks).
    schedule: "symmetric" (persistent programs, symmetric round robin) or "naive" (one program
              per task in request order: the baseline the round robin is measured against).
    """
    if len(q_lens) != len(kv_lens) or (stages is not None and len(stages) != len(q_lens)):
        raise ValueError("xyserve: q_lens, kv_lens and stages must have one entry per request")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"xyserve: {num_q_heads} query heads do not group over {num_kv_heads} kv heads")
    if causal not in CAUSAL_MODES or schedule not in ("symmetric", "naive"):
        raise ValueError(f"xyserve: causal must be one of {CAUSAL_MODES}, schedule symmetric or naive")
    profile = profile.for_batch(sum(q_lens), len(q_lens))
    group, tiles = num_q_heads // num_kv_heads, profile.attention_tiles(head_dim)
    q_arr, kv_arr = np.asarray(q_lens, dtype=np.int64), np.asarray(kv_lens, dtype=np.int64)
    if causal == "bottom_right" and (kv_arr < q_arr).any():
        b = int(np.flatnonzero(kv_arr < q_arr)[0])
        raise ValueError(f"xyserve: request {b} has {q_lens[b]} new tokens but only {kv_lens[b]} KV positions")
    if stages is None:
        stage_idx = np.where(q_arr == 1, 1, np.where(q_arr <= profile.verify_max_tokens, 2, 0))
    else:
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"xyserve: unknown stage {unknown.pop()!r}; expected one of {STAGES}")
        stage_idx = np.array([STAGES.index(x) for x in stages], dtype=np.int64)
    live = q_arr > 0
    t = request_tiles(q_arr[live], kv_arr[live], stage_idx[live], group, tiles, causal)
    t[:, 0] = np.flatnonzero(live)[t[:, 0]]  # back to the caller's request numbers
    # tiles x kv heads; a task costs its padded rows times (KV read + one tile of fixed work)
    t = np.repeat(t, num_kv_heads, axis=0)
    rows = np.zeros((len(t), TASK_FIELDS), dtype=np.int64)
    rows[:, [F_REQUEST, F_ROW_LO, F_ROW_HI, F_KV_LO, F_KV_HI, F_PATH]] = t[:, :6]
    rows[:, F_KV_HEAD] = np.tile(np.arange(num_kv_heads), len(t) // num_kv_heads)
    rows[:, F_PART_BASE], rows[:, F_NUM_SPLITS] = -1, 1
    req = rows[:, F_REQUEST]
    rows[:, F_Q_ROW0] = (np.cumsum(q_arr) - q_arr)[req]
    rows[:, F_Q_LEN], rows[:, F_SEQ_LEN] = q_arr[req], kv_arr[req]
    costs = t[:, 6] * (np.maximum(t[:, 4], 0) + t[:, 7])
    if schedule == "naive":
        return TaskPlan(max(1, len(rows)), rows, costs, np.arange(len(rows) + 1) if len(rows) else np.zeros(2, np.int64),
                        0, tiles)
    num_partials = 0
    num_pairs = len(q_arr) * num_kv_heads
    decode = _decode_batch(q_arr, causal, group, tiles, num_pairs <= profile.num_programs)
    if split_kv and len(rows) and not (decode and _keep_whole(kv_arr, num_pairs, profile)):
        rows, costs, num_partials = split_long_tasks(rows, costs, profile.num_programs, tiles, profile)
    order, starts = symmetric_round_robin(costs, profile.num_programs)
    decode = decode and num_partials == 0
    return TaskPlan(profile.num_programs, rows[order], costs[order], starts, num_partials, tiles,
                    len(q_arr) if decode else 0)


def _decode_batch(q_arr: np.ndarray, causal: str, group: int, tiles: AttentionTiles, fits: bool) -> bool:
    """Whether the kernel may map programs to (request, kv head) pairs directly, if nothing is
    split along KV: every request decodes one token over its whole KV (not SDPA's top-left
    causal, which shows a lone token only position 0), one small tile holds a GQA group, and
    every pair has a program of its own (`fits`; a program walking several pairs would not be
    balanced)."""
    return len(q_arr) > 0 and bool((q_arr == 1).all()) and causal != "top_left" and group <= tiles.small_rows and fits


def _keep_whole(kv_arr: np.ndarray, num_pairs: int, profile: TargetProfile) -> bool:
    """A decode batch whose pairs cover half the cores or more, with no KV much longer than the
    mean, streams faster unsplit: H200, 16 decodes of 1,000 positions 21.1 us a layer split
    against 16.1 whole, 32 of 2,000 46.8 against 35.7 (a split pays its merge and the walk).
    Few pairs (batch 1: 8 heads) or one long KV among short ones still split."""
    return num_pairs * 2 >= profile.num_cores and kv_arr.max() <= 2 * kv_arr.mean() + profile.min_split_kv


def build_task_table(q_lens: Sequence[int], kv_lens: Sequence[int], stages: Sequence[str] | None = None, *,
                     num_q_heads: int, num_kv_heads: int, head_dim: int,
                     device: torch.device | str | None = None, tree: bool = False) -> torch.Tensor:
    """The engine's entry: plain lists in, the int32 Task-Table out (on the host).

    `device` picks the profile (tile sizes, number of programs) the kernel will run with; pass the
    device the attention runs on. Pass tree=True when the step carries a tree mask whose corner
    may reach past the causal diagonal.
    """
    plan_ = plan(q_lens, kv_lens, stages, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                 head_dim=head_dim, profile=profile_for(device), causal="none" if tree else "bottom_right")
    return plan_.tensor()
