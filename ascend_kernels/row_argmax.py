"""Greedy tokens on the device: the argmax of every logits row in one launch.

torch reduces a 128k-entry row in one block, and the engine's chunked torch form still costs five
kernels (about 24 us of an H100 decode step at batch 16, outside the step's CUDA graph). Here a
program takes one chunk of one row and publishes its best (value, first index); the last program
of a row to arrive merges the row's chunks, so the whole argmax is one launch that a CUDA graph
can hold:

    logits [N, V]        chunk 0 | chunk 1 | ... | chunk C-1     (a program each, grid (C, N))
                            |         |               |
    workspace [N, C]     (v0,i0)   (v1,i1)   ...   (vC-1,iC-1)    <- then a ticket on count[n]
                                      \\   merged by the last  /
    out [N] int64                      first index of the max

Semantics are torch.argmax's: the first maximal index, a NaN counting as the maximum (its first
index wins). The arrival counters (arrival_counters.py) are zero between launches: the merging
program resets its row's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend_kernels.arrival_counters import arrival_counters
from ascend_kernels.profiles import next_power_of_2

BLOCK_V = 4096  # entries a program reduces: 32 programs a row for Llama-3's 128k vocabulary
BIG_INDEX = tl.constexpr(2**31 - 1)  # no index: loses every min (module globals in @triton.jit are constexprs)


@triton.jit
def _first_max(x, idx):
    """(value, first index) of the maximum of x [B] fp32, index by idx [B] int32; a NaN wins, and the
    value is then NaN."""
    nan = x != x
    num_nan = tl.sum(nan.to(tl.int32), axis=0)
    key = tl.where(nan, float("-inf"), x)
    best = tl.max(key, axis=0)
    first_nan = tl.min(tl.where(nan, idx, BIG_INDEX), axis=0)
    first_best = tl.min(tl.where(key == best, idx, BIG_INDEX), axis=0)
    value = tl.where(num_nan > 0, float("nan"), best)
    return value, tl.where(num_nan > 0, first_nan, first_best)


@triton.jit
def row_argmax_kernel(
    x_ptr,  # [N, V] logits, any float dtype, unit last stride
    val_ptr,  # [N, C] fp32 workspace: each chunk's maximum (NaN when the chunk holds one)
    idx_ptr,  # [N, C] int32 workspace: its first index
    count_ptr,  # [>= N] int32 arrival counters, zero between launches
    out_ptr,  # [N] int64 argmax of each row
    V, C, stride_x,
    BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0)
    n = tl.program_id(1)
    offs = c * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(x_ptr + n.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    value, index = _first_max(x, offs)
    tl.store(val_ptr + n * C + c, value)
    tl.store(idx_ptr + n * C + c, index)
    tl.debug_barrier()  # the chunk's stores precede the release below
    arrived = tl.atomic_add(count_ptr + n, 1, sem="acq_rel")
    if arrived == C - 1:
        cc = tl.arange(0, BLOCK_C)
        v = tl.load(val_ptr + n * C + cc, mask=cc < C, other=float("-inf"), volatile=True)
        i = tl.load(idx_ptr + n * C + cc, mask=cc < C, other=BIG_INDEX, volatile=True)
        _, best = _first_max(v, i)  # chunks hold increasing indices: the first best chunk is the first index
        tl.store(out_ptr + n, best.to(tl.int64))
        tl.atomic_xchg(count_ptr + n, 0)  # ready for the next launch


class RowArgmax:
    """The launch and its workspace, sized once for up to `max_rows` rows of `vocab` entries (a CUDA
    graph captures the workspace's addresses, so it must outlive every graph that uses it)."""

    def __init__(self, max_rows: int, vocab: int, device: torch.device) -> None:
        if max_rows < 1 or vocab < 1:
            raise ValueError(f"xyserve: RowArgmax needs max_rows >= 1 and vocab >= 1, got {max_rows}, {vocab}")
        self.max_rows, self.vocab = max_rows, vocab
        self.num_chunks = triton.cdiv(vocab, BLOCK_V)
        self.values = torch.empty(max_rows, self.num_chunks, dtype=torch.float32, device=device)
        self.indices = torch.empty(max_rows, self.num_chunks, dtype=torch.int32, device=device)

    def __call__(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """logits [N, V] -> int64 [N], equal to logits.argmax(dim=-1)."""
        if logits.dim() != 2 or logits.shape[1] != self.vocab or logits.shape[0] > self.max_rows:
            raise ValueError(f"xyserve: row_argmax takes [<= {self.max_rows}, {self.vocab}] logits, "
                             f"got {tuple(logits.shape)}")
        if logits.stride(1) != 1:
            raise ValueError("xyserve: row_argmax needs logits with a unit last stride")
        if logits.device != self.values.device:
            raise ValueError(f"xyserve: logits on {logits.device}, the workspace on {self.values.device}")
        num_rows = logits.shape[0]
        if out is None:
            out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
        if num_rows == 0:
            return out
        row_argmax_kernel[(self.num_chunks, num_rows)](
            logits, self.values, self.indices, arrival_counters(logits.device, num_rows), out, self.vocab, self.num_chunks, logits.stride(0),
            BLOCK_V=BLOCK_V, BLOCK_C=next_power_of_2(self.num_chunks), num_warps=4,
        )
        return out


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One-off form (allocates its workspace): logits [N, V] -> int64 [N] argmax per row."""
    return RowArgmax(max(1, logits.shape[0]), logits.shape[1], logits.device)(logits)
