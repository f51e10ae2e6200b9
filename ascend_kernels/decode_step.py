"""Launcher of the whole-step decode kernel (decode_step_kernel.py): a batch-1 decode step of a
Llama-style decoder (RMSNorm, RoPE, GQA attention over a paged KV cache, SiLU-gated MLP) as one
persistent launch on a Hopper GPU.

The kernel streams each kind of weight through one TMA descriptor, so the weights come stacked over
the layers (`DecodeWeights`), and it reads the KV cache of every layer from one tensor
[num_layers, num_blocks, block_size, num_kv_heads, head_dim]. `problem()` says why a model or card
cannot run it (None when it can); the callers fall back to their per-kernel path.
"""
from __future__ import annotations

import dataclasses
import math

import torch

# tiling of the kernel (measured on an H100 and an H200, benchmarks/RESULTS.md): 8-row tiles (one row per
# compute warp), 32 KB chunks of 8 TMA boxes, a 4-chunk ring, attention split in 2 over 128-position tiles
# (in 4 from position 512 on, where the grid has 4 programs a q head)
BN, BOX, NB, NBUF, NSPLIT, TILE = 8, 256, 8, 4, 2, 128
SMEM_BYTES = 227 * 1024
LONG_POS = 256 * NSPLIT  # from here on attention runs 2 NSPLIT splits where the grid has the programs


@dataclasses.dataclass(slots=True)
class DecodeWeights:
    """A decoder's weights stacked per kind, rows of layer l at [l * N, (l + 1) * N)."""

    wq: torch.Tensor  # [NL * (NQH + 2 NKV) * D, H]: q; k; v of each layer
    wo: torch.Tensor  # [NL * H, NQH * D]
    wg: torch.Tensor  # [NL * 2 I, H]: gate; up of each layer
    wd: torch.Tensor  # [NL * I, H]: down_proj transposed (row i of layer l is column i of its W_down)
    wl: torch.Tensor  # [V, H] lm_head
    n1: torch.Tensor  # [NL, H] input norms
    n2: torch.Tensor  # [NL, H] post-attention norms
    nf: torch.Tensor  # [H] final norm
    embed: torch.Tensor  # [V, H]
    inv_freq: torch.Tensor  # [D / 2] fp32 RoPE frequencies (scaling included)
    rope_scale: float  # RoPE's attention scaling (1.0 for plain RoPE)
    eps: float
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        nl, h = self.n1.shape
        d, nq, nkv = self.head_dim, self.num_q_heads, self.num_kv_heads
        i = self.wg.shape[0] // (2 * nl)
        want = {"wq": (nl * (nq + 2 * nkv) * d, h), "wo": (nl * h, nq * d), "wg": (nl * 2 * i, h),
                "wd": (nl * i, h), "wl": (self.embed.shape[0], h), "n2": (nl, h), "nf": (h,),
                "inv_freq": (d // 2,)}
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"DecodeWeights.{name}: expected a contiguous {shape}, got {tuple(t.shape)}")

    @property
    def dims(self) -> dict:
        nl, h = self.n1.shape
        return {"NL": nl, "H": h, "I": self.wg.shape[0] // (2 * nl), "V": self.embed.shape[0], "NQH": self.num_q_heads,
                "NKV": self.num_kv_heads, "D": self.head_dim}


def card_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why weights of this dtype on this device cannot run the kernel, or None (checked before any
    weights are stacked)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "needs an sm_90 (Hopper) GPU"
    if dtype != torch.bfloat16:
        return "needs bf16 weights"
    return None


def problem(w: DecodeWeights, block_size: int, device: torch.device) -> str | None:
    """Why this model / card cannot run the kernel, or None."""
    dtypes = {t.dtype for t in (w.wq, w.wo, w.wg, w.wd, w.wl, w.embed)}
    reason = card_problem(device, dtypes.pop() if len(dtypes) == 1 else None)
    if reason is not None:
        return reason
    d, kc, grid = w.dims, BOX * NB, torch.cuda.get_device_properties(device).multi_processor_count
    if w.head_dim != 64:
        return f"head_dim {w.head_dim} (the kernel's attention takes 64)"
    if d["H"] != kc or d["NQH"] * w.head_dim != d["H"]:  # a row's chunk is one row of every weight
        return f"hidden size {d['H']} (the kernel takes {kc}, with q heads x head_dim = hidden)"
    if d["I"] % BN or d["H"] // BN < grid or d["I"] // BN < grid or d["NQH"] * NSPLIT > grid or d["V"] % BN:
        return "the grid needs a row tile of every GEMV and a program for every attention split"
    if 5 * d["NL"] + 2 > 32 * NB or 2 * d["H"] * 4 + NBUF * NB * BN * BOX * 2 > SMEM_BYTES - 4096:
        return "too many layers or too large a hidden size for the kernel's counters / shared memory"
    return None


def grid_candidates(w: DecodeWeights, num_sms: int) -> list[int]:
    """Grids worth timing: the SM count and every power of two from the attention's program count up to
    it. Llama's widths are multiples of 128 rows, so a power-of-two grid splits every stage's row tiles
    evenly; and the fewer the programs, the fewer the residual atomics and counter arrivals per stage
    (on an H100, 64 programs ran a step faster than 132; benchmarks/RESULTS.md)."""
    grids, g = {num_sms}, 1
    while g <= num_sms:
        if g >= w.num_q_heads * NSPLIT:
            grids.add(g)
        g *= 2
    return sorted(grids)


class DecodeStepKernel:
    """One request's batch-1 decode step in one launch: `launch(token, pos, block_table_row)` reads the
    token id, its position and the request's block table from device tensors (int32 or int64), writes
    the new token's K/V into the cache and returns the logits [V] fp32 (a buffer reused every step)."""

    def __init__(self, w: DecodeWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
                 grid: int | None = None):
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        reason = problem(w, block_size, w.embed.device)
        if reason is not None:
            raise ValueError(f"decode step kernel: {reason}")
        d = w.dims
        if k_cache.shape[0] != d["NL"] or k_cache.shape[2:] != (block_size, d["NKV"], w.head_dim):
            raise ValueError(f"decode step kernel: KV cache {tuple(k_cache.shape)} is not [layers, blocks, "
                             f"{block_size}, {d['NKV']}, {w.head_dim}]")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape):
            raise ValueError("decode step kernel: K and V caches must be contiguous and of one shape")
        self.w, self.k_cache, self.v_cache, self.block_size = w, k_cache, v_cache, block_size
        layout = gl.NVMMASharedLayout(0, 16, rank=2)
        self.descs = [TensorDescriptor.from_tensor(t, [BN, BOX], layout) for t in (w.wq, w.wo, w.wg, w.wd, w.wl)]
        dev = w.embed.device
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        f32 = {"device": dev, "dtype": torch.float32}
        self.hidden = torch.empty(d["H"], **f32)
        self.qkv = torch.empty((d["NQH"] + 2 * d["NKV"]) * w.head_dim, **f32)
        self.hidden_attn, self.logits = torch.empty(d["H"], **f32), torch.empty(d["V"], **f32)
        self.part = torch.empty(d["NQH"] * 2 * NSPLIT * (w.head_dim + 2), **f32)  # long contexts: 2 NSPLIT
        self.best_val = torch.empty(self.num_sms, **f32)
        self.best_idx = torch.empty(self.num_sms, device=dev, dtype=torch.int32)
        self.counters = torch.zeros(5 * d["NL"] + 2, device=dev, dtype=torch.int32)  # zero between launches
        if grid is not None and grid not in grid_candidates(w, self.num_sms):
            raise ValueError(f"decode step kernel: grid {grid} is not one of {grid_candidates(w, self.num_sms)}")
        self.grid_us: dict[int, float] = {}
        self.grid_us_long: dict[int, float] = {}
        self.grid = grid or self.tune_grid()
        self.grid_long = grid or self.tune_grid(2 * LONG_POS)

    def grid_for(self, pos: int) -> int:
        """The grid timed fastest for a step at position `pos`: short contexts gain from fewer programs
        (fewer counter arrivals and residual atomics), long ones need the attention splits of a large grid
        (H200, benchmarks/RESULTS.md: 64 programs 752 us at position 192, 128 programs 838 us at 900)."""
        return self.grid_long if pos >= LONG_POS else self.grid

    def launch(self, token: torch.Tensor, pos: torch.Tensor, block_table: torch.Tensor,
               tokens_out: torch.Tensor | None = None, loop: bool = False, grid: int | None = None) -> torch.Tensor:
        """The step's logits. With `tokens_out` (int64) the kernel also picks the greedy token into
        tokens_out[0]; with `loop` it instead writes it into `token` and tokens_out[pos] and steps `pos`:
        a decode loop with no host work. `grid`: the programs (default the short-context `grid`; any
        candidate computes the same step)."""
        pick = 0 if tokens_out is None else 2 if loop else 1
        self._run(token, pos, block_table, self.k_cache, self.v_cache, tokens_out if pick else token, pick,
                  grid or self.grid)
        return self.logits

    def _run(self, token, pos, block_table, k_cache, v_cache, tokens_out, pick: int, grid: int) -> None:
        from ascend_kernels.decode_step_kernel import LOG2E, decode_step_kernel

        w = self.w
        decode_step_kernel[(grid,)](
            *self.descs, self.hidden, self.hidden_attn, self.qkv, self.part, self.logits, w.n1, w.n2, w.nf,
            k_cache, v_cache, block_table, pos, w.inv_freq, self.counters, token, tokens_out, w.embed,
            self.best_val, self.best_idx, w.eps, w.rope_scale, LOG2E / math.sqrt(w.head_dim), k_cache[0].numel(),
            grid, **w.dims, BS=self.block_size, NSPLIT=NSPLIT, T=TILE, BN=BN, BOX=BOX, NB=NB, NBUF=NBUF,
            PICK=pick, num_warps=NB)

    def tune_grid(self, pos: int = 0, repeats: int = 5) -> int:
        """Time `repeats` launches at each of `grid_candidates` on a scratch zero cache at position `pos`
        and return the fastest grid; `grid_us` (position 0) or `grid_us_long` keeps the times (us per
        launch)."""
        d, dev = self.w.dims, self.w.embed.device
        blocks = pos // self.block_size + 1
        cache = torch.zeros((d["NL"], blocks, *self.k_cache.shape[2:]), device=dev, dtype=self.k_cache.dtype)
        token = torch.zeros(1, device=dev, dtype=torch.int64)
        position = torch.full((1,), pos, device=dev, dtype=torch.int32)
        table = torch.arange(blocks, device=dev, dtype=torch.int32)
        times = self.grid_us if pos == 0 else self.grid_us_long
        times.clear()
        for grid in grid_candidates(self.w, self.num_sms):
            self._run(token, position, table, cache, cache, token, 0, grid)  # the first compiles
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                self._run(token, position, table, cache, cache, token, 0, grid)
            end.record()
            end.synchronize()
            times[grid] = start.elapsed_time(end) * 1e3 / repeats
        return min(times, key=times.get)
