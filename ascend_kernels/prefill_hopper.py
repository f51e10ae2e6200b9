"""Prefill batches on Hopper: when the Gluon kernel (prefill_hopper_kernel.py) runs, and its launcher.

The meta-kernel (attention_kernel.py) serves every batch on every target. On an sm_90 GPU, a batch
whose requests all bring at least MIN_QUERY_TOKENS new tokens (prefill or chunked prefill, no tree
mask) runs instead on a warp-specialised Gluon kernel that overlaps softmax with the tensor cores,
which plain Triton 3.6 cannot express on Hopper. Everything else, decodes and verifies included,
stays on the meta-kernel. Gluon has no CPU interpreter, so CI tests this module's planning only;
the kernel's tests are GPU tests.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

MIN_QUERY_TOKENS = 128  # one full tile of query rows per request; shorter ones waste most of a tile
HEAD_DIMS = (64, 128)
PAGE_SIZES = (16, 32, 64, 128)  # divide the KV tile; multiples of the 8-row swizzle atom
SMEM_BYTES = 227 * 1024  # per block on sm_90
_failed: list[str] = []  # set once a launch raised (e.g. a Triton whose Gluon API moved): the meta-kernel from then on


@dataclass(frozen=True, slots=True)
class HopperPrefillConfig:
    """Tile shape and pipeline depth. Measured on an H100 (benchmarks/RESULTS.md, tenth session):
    128 x 128 tiles with a 3-slot K/V ring and one Q slot beat 64-wide tiles and a double-buffered Q."""

    block_m: int = 128  # two compute warpgroups of 64 rows
    block_n: int = 128
    num_buf: int = 3
    q_buf: int = 1
    compute_regs: int = 232
    loader_regs: int = 24
    maxnreg: int = 168  # 12 warps x 168 = the register file; setmaxnreg moves them to the compute warps

    def __post_init__(self):
        if self.block_m != 128:
            raise ValueError("block_m must be 128: two compute warpgroups of 64 rows")
        if self.block_n not in (64, 128) or self.num_buf < 2 or self.q_buf < 1:
            raise ValueError(f"unsupported pipeline {self}")

    def smem_bytes(self, head_dim: int, elem_bytes: int) -> int:
        return (self.q_buf * self.block_m + 2 * self.num_buf * self.block_n) * head_dim * elem_bytes + 1024


@functools.cache
def _gluon_kernel():
    """The Gluon kernel, or the reason it cannot be imported (an older or newer Triton)."""
    try:
        from ascend_kernels.prefill_hopper_kernel import prefill_hopper_kernel
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    except Exception as exc:  # noqa: BLE001 - any import failure means: use the meta-kernel
        return f"Gluon unavailable ({type(exc).__name__}: {exc})"
    return prefill_hopper_kernel, gl, TensorDescriptor


@functools.cache
def _smem_layouts(dtype: torch.dtype, block_m: int, page: int, half: int):
    """The Q-tile and page smem layouts (computing one costs ~6 us of host time per launch)."""
    gl = _gluon_kernel()[1]
    elem = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([block_m, half], elem),
            gl.NVMMASharedLayout.get_default_for([page, half], elem))


@functools.cache
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def problem(q, k_cache, v_cache, q_lens, tree_mask=None, config: HopperPrefillConfig = HopperPrefillConfig()):
    """Why this batch cannot take the Hopper prefill kernel (None when it can)."""
    if q.device.type != "cuda" or not _is_sm90(q.device.index or 0):
        return "needs an sm_90 (Hopper) GPU"
    if _failed:
        return _failed[0]
    if tree_mask is not None:
        return "tree masks run on the meta-kernel"
    if not q_lens or min(q_lens) < MIN_QUERY_TOKENS:
        return f"a request with fewer than {MIN_QUERY_TOKENS} query tokens"
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return f"dtype {q.dtype} (fp16 / bf16 only)"
    if q.shape[-1] not in HEAD_DIMS or k_cache.shape[-1] != q.shape[-1] or v_cache.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (64 / 128 only)"
    if k_cache.shape[1] not in PAGE_SIZES or config.block_n % k_cache.shape[1]:
        return f"page size {k_cache.shape[1]}"
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k_cache, v_cache)):
        return "q and the caches must be contiguous and 16-byte aligned (TMA)"
    if q.numel() >= 2**31 or k_cache.shape[0] * k_cache.shape[1] >= 2**31:
        return "more than 2^31 query elements or cache rows (the kernel's offsets and TMA coordinates are int32)"
    if config.smem_bytes(q.shape[-1], q.element_size()) > SMEM_BYTES:
        return "the pipeline does not fit in shared memory"
    kernel = _gluon_kernel()
    return kernel if isinstance(kernel, str) else None


def task_rows(q_lens, kv_lens, num_heads: int, group: int, block_m: int, grid: int) -> list[tuple[int, int, int]]:
    """(request, first query row, q head) per task, for `grid` persistent programs: program p runs rows
    p, p+grid, p+2*grid, ... Tasks are sorted by cost (KV tokens the tile reads), heaviest first, heads
    sharing a KV head kept adjacent, and dealt in symmetric round robin (1..G, G..1, ...); holes in the
    last round are (-1, 0, 0)."""
    tasks = []
    for b, (n, kv) in enumerate(zip(q_lens, kv_lens)):
        for m0 in range(0, n, block_m):
            cost = min(kv, kv - n + m0 + block_m)
            tasks += [(-cost, b, h // group, h, m0) for h in range(num_heads)]
    tasks.sort()
    rows = [(-1, 0, 0)] * (-(-len(tasks) // grid) * grid)
    for k, (_, b, _, h, m0) in enumerate(tasks):
        rnd, i = divmod(k, grid)
        rows[rnd * grid + (i if rnd % 2 == 0 else grid - 1 - i)] = (b, m0, h)
    return rows


class HopperPrefill:
    """A batch's task list and grid, built once from host lengths; call it with the batch's tensors."""

    def __init__(self, q_lens, kv_lens, num_heads: int, num_kv_heads: int, device,
                 config: HopperPrefillConfig = HopperPrefillConfig()):
        self.config = config
        tasks = sum(-(-n // config.block_m) for n in q_lens) * num_heads
        self.grid = max(1, min(torch.cuda.get_device_properties(device).multi_processor_count, tasks))
        rows = task_rows(q_lens, kv_lens, num_heads, num_heads // num_kv_heads, config.block_m, self.grid)
        self.tasks = torch.tensor(rows, dtype=torch.int32).to(device)

    def __call__(self, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale: float, out=None):
        kernel, _, descriptor = _gluon_kernel()
        c = self.config
        num_tokens, num_heads, d = q.shape
        num_blocks, page, num_kv_heads, _ = k_cache.shape
        if out is None:
            out = torch.empty_like(q)
        q_layout, kv_layout = _smem_layouts(q.dtype, c.block_m, page, d // 2)
        q_desc = descriptor(q.view(num_tokens, num_heads * d), [num_tokens, num_heads * d], [num_heads * d, 1],
                            [c.block_m, d // 2], q_layout)
        rows, cols = num_blocks * page, num_kv_heads * d
        k_desc, v_desc = (descriptor(t.view(rows, cols), [rows, cols], [cols, 1], [page, d // 2], kv_layout)
                          for t in (k_cache, v_cache))
        block_table = block_table.to(torch.int32)
        kernel[(self.grid,)](
            q_desc, k_desc, v_desc, out, block_table, self.tasks, cu_seqlens_q.to(torch.int32),
            seq_lens.to(torch.int32), self.tasks.shape[0], self.grid, block_table.stride(0), scale * 1.4426950408889634,
            NUM_HEADS=num_heads, GROUP=num_heads // num_kv_heads, D=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            PAGE=page, NUM_BUF=c.num_buf, QBUF=c.q_buf, COMPUTE_REGS=c.compute_regs, LOADER_REGS=c.loader_regs,
            num_warps=4, maxnreg=c.maxnreg,
        )
        return out


def try_run(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, q_lens, tree_mask=None, out=None):
    """Run the batch on the Gluon kernel if it applies (`problem`), else None. A launch that raises
    (a compile error) is reported once and switches this path off: the caller's meta-kernel runs."""
    if (out is not None and not out.is_contiguous()) or problem(q, k_cache, v_cache, q_lens, tree_mask):
        return None
    try:
        launcher = HopperPrefill(q_lens, seq_lens.tolist(), q.shape[1], k_cache.shape[2], q.device)
        return launcher(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, out)
    except Exception as exc:  # noqa: BLE001 - reported, and the meta-kernel gives the same numbers
        _failed.append(f"the Gluon prefill kernel failed ({type(exc).__name__}: {str(exc)[:200]})")
        warnings.warn(f"xyserve attention: {_failed[0]}; using the meta-kernel", stacklevel=3)
        return None
