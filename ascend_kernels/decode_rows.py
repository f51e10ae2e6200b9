"""Launcher of the multi-row decode kernel (decode_rows_kernel.py): a decode step of up to 16 requests of
a Llama-style decoder as one persistent launch on a Hopper GPU, next to the batch-1 kernel
(decode_step.py), which this object also runs for one-request steps and their bursts.

Compiled and checked on the CPU only so far (tests/kernels/test_decode_rows_kernel.py has the GPU test); the
engine does not construct it yet.
"""
from __future__ import annotations

import math

import torch

from ascend_kernels.decode_step import BN, DecodeStepKernel, DecodeWeights, problem

# 64-position attention tiles: with 128 the kernel spills registers (72 bytes, ptxas for sm_90a)
MAX_ROWS, NB, NBUF, TILE, KC = 16, 8, 4, 64, 2048


def rows_problem(w: DecodeWeights, block_size: int, device: torch.device) -> str | None:
    """Why this model / card cannot run the multi-row kernel, or None."""
    reason = problem(w, block_size, device)
    if reason is None and w.dims["I"] % KC:
        reason = f"MLP width {w.dims['I']} (the multi-row kernel's down projection takes multiples of {KC})"
    return reason


def down_as_stored(w: DecodeWeights) -> torch.Tensor:
    """W_down as the model stores it, [H, I] per layer stacked: the batch-1 kernel keeps it transposed, the
    multi-row kernels stream its rows."""
    i = w.dims["I"]
    return torch.cat([w.wd[layer * i:(layer + 1) * i].t() for layer in range(w.dims["NL"])]).contiguous()


class DecodeRowsKernel:
    """`launch_rows(input_ids, position_ids, block_table, slot_mapping, tokens_out)`: the step's leading
    rows with a non-negative slot (at most 16) each decode one token; their K/V go into the cache, their
    logits into `rows_logits` [16, V] fp32 and their greedy tokens into tokens_out[row]. `launch` runs
    the batch-1 kernel (DecodeStepKernel.launch) on the same weights and cache."""

    max_rows = MAX_ROWS

    def __init__(self, w: DecodeWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int):
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        reason = rows_problem(w, block_size, w.embed.device)
        if reason is not None:
            raise ValueError(f"multi-row decode kernel: {reason}")
        self.single = DecodeStepKernel(w, k_cache, v_cache, block_size)
        d, dev = w.dims, w.embed.device
        nl, h, i = d["NL"], d["H"], d["I"]
        self.wd = down_as_stored(w)
        layout = gl.NVMMASharedLayout(128, 16, rank=2)
        self.descs = [TensorDescriptor.from_tensor(t, [BN, 64], layout) for t in (w.wq, w.wo, w.wg, self.wd, w.wl)]
        self.grid = 1 << (self.single.num_sms.bit_length() - 1)  # a power of two splits Llama's tiles evenly
        self.max_tiles = -(-(h // BN) // self.grid)
        f32 = {"device": dev, "dtype": torch.float32}
        nq = (d["NQH"] + 2 * d["NKV"]) * w.head_dim
        self.hidden, self.qkv = torch.empty(MAX_ROWS, h, **f32), torch.empty(MAX_ROWS, nq, **f32)
        bf16 = {"device": dev, "dtype": torch.bfloat16}  # the GEMVs take these inputs as bf16 anyway
        self.attn, self.g = torch.empty(MAX_ROWS, h, **bf16), torch.empty(MAX_ROWS, i, **bf16)
        self.rows_logits = torch.empty(MAX_ROWS, d["V"], **f32)
        self.best_val = torch.empty(self.grid, MAX_ROWS, **f32)
        self.best_idx = torch.empty(self.grid, MAX_ROWS, device=dev, dtype=torch.int32)
        self.counters = torch.zeros(2 + 5 * nl, device=dev, dtype=torch.int32)  # zero between launches

    @property
    def logits(self) -> torch.Tensor:
        """The batch-1 kernel's logits [V] (its last launch)."""
        return self.single.logits

    def launch(self, token, pos, block_table, tokens_out=None, loop=False) -> torch.Tensor:
        return self.single.launch(token, pos, block_table, tokens_out, loop)

    def launch_rows(self, input_ids: torch.Tensor, position_ids: torch.Tensor, block_table: torch.Tensor,
                    slot_mapping: torch.Tensor, tokens_out: torch.Tensor) -> torch.Tensor:
        from ascend_kernels.decode_rows_kernel import decode_rows_kernel
        from ascend_kernels.decode_step_kernel import LOG2E

        s, w = self.single, self.single.w
        if block_table.stride(1) != 1 or tokens_out.dtype != torch.int64:
            raise ValueError("multi-row decode kernel: block_table rows must be contiguous, tokens_out int64")
        decode_rows_kernel[(self.grid,)](
            *self.descs, input_ids, position_ids, slot_mapping, block_table, block_table.stride(0),
            input_ids.shape[0], self.hidden, self.qkv, self.attn, self.g, self.rows_logits, w.n1, w.n2, w.nf,
            s.k_cache, s.v_cache, w.inv_freq, w.embed, self.counters, tokens_out, self.best_val, self.best_idx,
            w.eps, w.rope_scale, LOG2E / math.sqrt(w.head_dim), s.k_cache[0].numel(), self.grid, **w.dims,
            BS=s.block_size, TILE=TILE, MB=MAX_ROWS, BN=BN, NB=NB, NBUF=NBUF, MAXT=self.max_tiles, num_warps=NB)
        return self.rows_logits
