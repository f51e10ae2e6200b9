"""Launcher of the swap-AB wgmma multi-row decode kernel (decode_rows_wgmma_kernel.py): a decode step of up
to 16 requests of a Llama-style decoder as one persistent launch on a Hopper GPU. Same interface as
DecodeRowsKernel (decode_rows.py), which it replaces in the engine (`decode_megakernel_rows`). On an H100
(benchmarks/RESULTS.md, twentieth session) a 16-row step took 1,258 us against the mma_v2 kernel's ~1,840
and ~1,091 us for the same kernel without attention (results wrong): attention ~10 us a layer.

Its q/k/v and gate/up weights carry the layers' norm weights (W * w_norm, column by column), so this
object holds folded copies of them (for Llama-3.2-1B 1.3 GB next to the stacked weights); sharing one
folded copy with the batch-1 kernel (given unit norm weights) would remove that.
"""
from __future__ import annotations

import math

import torch

from ascend_kernels.decode_rows import MAX_ROWS, down_as_stored, rows_problem
from ascend_kernels.decode_step import DecodeStepKernel, DecodeWeights

# ring slots, attention positions a tile (at 128 the attention loop spills), item K, programs (at most)
NBUF, TILE, KS, GRID = 4, 64, 2048, 128


def wgmma_rows_problem(w: DecodeWeights, block_size: int, device: torch.device) -> str | None:
    """Why this model / card cannot run the kernel, or None."""
    reason = rows_problem(w, block_size, device)
    d = w.dims
    if reason is None and d["H"] != KS:
        reason = f"hidden size {d['H']} (the kernel stages rows of {KS})"
    if reason is None and (d["V"] % 64 or ((d["NQH"] + 2 * d["NKV"]) * w.head_dim) % 64):
        reason = "vocabulary and q/k/v width must be multiples of 64 (the weight tiles' rows)"
    return reason


def _folded(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """W [NL * N, H] times each layer's norm weight [NL, H] along H (rounded once to W's dtype)."""
    nl, h = norm.shape
    return (w.view(nl, -1, h).float() * norm.view(nl, 1, h).float()).to(w.dtype).view(-1, h)


class DecodeRowsWgmmaKernel:
    """`launch_rows(input_ids, position_ids, block_table, slot_mapping, tokens_out)`: the step's leading
    rows with a non-negative slot (at most 16) each decode one token; their K/V go into the cache, their
    logits into `rows_logits` [16, V] fp32 and their greedy tokens into tokens_out[row]; with loop=True
    also over input_ids[row], and position_ids[row] and slot_mapping[row] step to the next position (its
    block from block_table), so the next launch decodes the next token. `launch` runs the batch-1 kernel
    (DecodeStepKernel.launch) on the same weights and cache."""

    max_rows = MAX_ROWS
    # launch_rows(..., loop=True) lets the engine run bursts of rows (DecodeKernelPath); checked on a GPU by
    # tests/kernels/test_decode_rows_kernel.py::test_wgmma_loop_launches_feed_the_next_launch
    rows_loop = True

    def __init__(self, w: DecodeWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int):
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        reason = wgmma_rows_problem(w, block_size, w.embed.device)
        if reason is not None:
            raise ValueError(f"wgmma multi-row decode kernel: {reason}")
        self.single = DecodeStepKernel(w, k_cache, v_cache, block_size)
        d, dev = w.dims, w.embed.device
        nl, h, i = d["NL"], d["H"], d["I"]
        self.wq, self.wg = _folded(w.wq, w.n1), _folded(w.wg, w.n2)
        self.wd = down_as_stored(w)
        layout = gl.NVMMASharedLayout(128, 16, rank=2)
        weights = (self.wq, w.wo, self.wg, self.wd, w.wl)
        self.descs = [TensorDescriptor.from_tensor(t, [64, 64], layout) for t in weights]
        self.grid = min(GRID, self.single.num_sms)
        bf16 = {"device": dev, "dtype": torch.bfloat16}
        f32 = {"device": dev, "dtype": torch.float32}
        nq = (d["NQH"] + 2 * d["NKV"]) * w.head_dim
        # rows past a step's M are never written: they stay zero (or hold an earlier step's rows, which only
        # reach the masked output columns)
        self.hidden, self.hb = torch.zeros(MAX_ROWS, h, **f32), torch.zeros(MAX_ROWS, h, **bf16)
        self.qkv, self.attn = torch.zeros(MAX_ROWS, nq, **bf16), torch.zeros(MAX_ROWS, h, **bf16)
        self.g = torch.zeros(MAX_ROWS, i, **bf16)
        self.rope = torch.empty(MAX_ROWS, 2, w.head_dim, **f32)
        self.acts = [TensorDescriptor.from_tensor(t, [MAX_ROWS, 64], layout) for t in (self.attn, self.hb, self.g)]
        self.part = torch.empty(h // 64 * (i // KS), 64, MAX_ROWS, **f32)
        self.rows_logits = torch.empty(MAX_ROWS, d["V"], **f32)
        self.best_val = torch.empty(self.grid, MAX_ROWS, **f32)
        self.best_idx = torch.empty(self.grid, MAX_ROWS, device=dev, dtype=torch.int32)
        self.counters = torch.zeros(1 + 5 * nl + h // 64 + 1, device=dev, dtype=torch.int32)  # zero between launches

    @property
    def logits(self) -> torch.Tensor:
        """The batch-1 kernel's logits [V] (its last launch)."""
        return self.single.logits

    def grid_for(self, pos: int) -> int:
        """The batch-1 kernel's grid for a step at position `pos`."""
        return self.single.grid_for(pos)

    def launch(self, token, pos, block_table, tokens_out=None, loop=False, grid=None) -> torch.Tensor:
        """The batch-1 kernel (DecodeStepKernel.launch) on the same weights and cache."""
        return self.single.launch(token, pos, block_table, tokens_out, loop, grid)

    def launch_rows(self, input_ids: torch.Tensor, position_ids: torch.Tensor, block_table: torch.Tensor,
                    slot_mapping: torch.Tensor, tokens_out: torch.Tensor, loop: bool = False) -> torch.Tensor:
        from ascend_kernels.decode_rows_wgmma_kernel import decode_rows_wgmma_kernel
        from ascend_kernels.decode_step_kernel import LOG2E

        s, w = self.single, self.single.w
        if block_table.stride(1) != 1 or tokens_out.dtype != torch.int64:
            raise ValueError("wgmma multi-row decode kernel: block_table rows must be contiguous, tokens_out int64")
        decode_rows_wgmma_kernel[(self.grid,)](
            *self.descs, *self.acts, input_ids, position_ids, slot_mapping, block_table, block_table.stride(0),
            input_ids.shape[0], self.hidden, self.hb, self.qkv, self.attn, self.g, self.part, self.rows_logits, w.nf,
            s.k_cache, s.v_cache, w.inv_freq, self.rope, w.embed, self.counters, tokens_out, self.best_val,
            self.best_idx,
            w.eps, w.rope_scale, LOG2E / math.sqrt(w.head_dim), s.k_cache[0].numel(), self.grid,
            NL=w.dims["NL"], H=w.dims["H"], I=w.dims["I"], V=w.dims["V"], NQH=w.dims["NQH"], NKV=w.dims["NKV"],
            D=w.dims["D"], BS=s.block_size, TILE=TILE, MB=MAX_ROWS, NBUF=NBUF, LOOP=int(loop), num_warps=4)
        return self.rows_logits
