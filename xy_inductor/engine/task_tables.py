"""TaskTables: the step's meta-attention Task-Table, re-planned only when the batch's shape changes.

Planning (ascend_kernels.tiling.plan) costs 0.1-0.6 ms of numpy per step, about a decode step of
a small model. Between consecutive decode steps only the KV lengths move (each by the tokens
the request computed), so a plan is reused while the rows keep their query lengths and stages
and no KV length shrank or grew by more than `max_drift`: the tasks that end at their request's
KV end (unsplit tasks and the last piece of a split task) move their end by the growth, and every
task's copy of its request's KV length moves with it; every other range is unchanged. That is
the exact causal range a fresh plan would give the same tiles; only the cost balance between programs drifts, which re-planning every `max_drift` tokens bounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ascend_kernels import tiling
from ascend_kernels.profiles import TargetProfile
from xy_inductor.engine.model_check import LayerSpec

_FIRST_TASK = tiling.HEADER  # + num_programs + 1


@dataclass(slots=True)
class _Plan:
    key: tuple
    kv_lens: np.ndarray  # [R] KV lengths the table currently holds
    table: np.ndarray  # flat int32 Task-Table
    kv_hi: np.ndarray  # [num_tasks] int32 view of the tasks' KV ends inside `table`
    request: np.ndarray  # [num_tasks] request of each task that follows its KV end, else -1
    seq_len: np.ndarray  # [num_tasks] int32 view of the tasks' request KV lengths inside `table`
    owner: np.ndarray  # [num_tasks] request of every task


class TaskTables:
    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, max_drift: int = 32) -> None:
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.max_drift = max_drift
        self._last: _Plan | None = None
        self.num_planned = 0
        self.num_reused = 0

    def table(self, q_lens: np.ndarray, kv_lens: np.ndarray, stages: list[str], profile: TargetProfile) -> np.ndarray:
        """The flat int32 Task-Table of the step, for exactly `profile` (the variant the launch runs)."""
        key = (profile, q_lens.tobytes(), tuple(stages))
        last = self._last
        if last is not None and last.key == key:
            grow = kv_lens - last.kv_lens
            if grow.min() >= 0 and grow.max() <= self.max_drift:
                follow = last.request >= 0
                last.kv_hi[follow] += grow[last.request[follow]].astype(np.int32)
                last.seq_len += grow[last.owner].astype(np.int32)
                last.kv_lens = kv_lens.copy()
                self.num_reused += 1
                return last.table
        self._last = self._plan(key, q_lens, kv_lens, stages, profile)
        self.num_planned += 1
        return self._last.table

    def _plan(self, key, q_lens, kv_lens, stages, profile: TargetProfile) -> _Plan:
        plan = tiling.plan(q_lens.tolist(), kv_lens.tolist(), stages, num_q_heads=self.num_q_heads,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, profile=profile)
        table = plan.tensor().numpy().copy()
        start = _FIRST_TASK + plan.num_programs + 1
        tasks = table[start:].reshape(-1, tiling.TASK_FIELDS)
        last_piece = tasks[:, tiling.F_SPLIT] == tasks[:, tiling.F_NUM_SPLITS] - 1
        # an unsplit task ends at kv_len - q_len + (its last token) + 1, the last piece of a split
        # task at its request's KV end: both move with kv_len (q_len is part of the key); the other
        # pieces of a split task cover a fixed prefix
        request = np.where(last_piece, tasks[:, tiling.F_REQUEST], -1).astype(np.int64)
        return _Plan(key, kv_lens.copy(), table, tasks[:, tiling.F_KV_HI], request, tasks[:, tiling.F_SEQ_LEN],
                     tasks[:, tiling.F_REQUEST].astype(np.int64))


def table_capacity(profile: TargetProfile, spec: LayerSpec, num_tokens: int, num_seqs: int) -> int:
    """An upper bound on the int32 length of any Task-Table of num_tokens tokens in num_seqs
    requests: a request of q tokens makes at most q * group / small_rows + 1 query tiles per KV
    head (every tile step is >= small_rows rows), and KV splitting adds at most max_partials tasks."""
    group = spec.num_q_heads // spec.num_kv_heads
    small = profile.attention_tiles(spec.head_dim).small_rows
    tasks = spec.num_kv_heads * (-(-num_tokens * group // small) + num_seqs) + profile.max_partials
    return tiling.HEADER + profile.num_programs + 1 + tiling.TASK_FIELDS * tasks
