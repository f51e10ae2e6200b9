"""Meta-attention launchers: paged mixed-batch attention and the dense SDPA entry.

Both run `meta_attention_kernel` (attention_kernel.py) once over a Task-Table (tiling.py). The
dense entry reads K/V by strides instead of through a block table (PAGED=False), so it needs no
copy of HF's tensors. Inputs the kernel does not handle fall back to the pure-torch reference
with a one-time warning: never wrong numbers.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from ascend_kernels import prefill_hopper, reference
from ascend_kernels.arrival_counters import arrival_counters
from ascend_kernels.attention_kernel import LOG2E, meta_attention_kernel
from ascend_kernels.launch_cache import LaunchCache
from ascend_kernels.profiles import AttentionTiles, TargetProfile, interpreting, next_power_of_2, profile_for
from ascend_kernels.tiling import plan

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_warned: set[str] = set()
_dense_plans: dict[tuple, torch.Tensor] = {}
_captured_plans: set[tuple] = set()  # keys of tables a CUDA graph has captured: never dropped
_LAUNCH = LaunchCache(meta_attention_kernel)  # eager calls skip Triton's per-call binding of ~50 arguments


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"xyserve attention: {reason}; using the pure-torch reference", stacklevel=3)


def _runnable(t: torch.Tensor) -> str | None:
    if t.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 for the Triton kernel"
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype} is not fp16/bf16/fp32"
    return None


@dataclass(slots=True)
class Operands:
    """Everything one launch reads besides q/k/v/out; unused ones are dummies."""

    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    tree: torch.Tensor
    mask: torch.Tensor
    mask_kind: int
    paged: bool
    causal: bool
    num_requests: int
    dense_q_len: int = 0
    dense_kv_len: int = 0
    seq_lens: torch.Tensor | None = None  # [B] paged: KV lengths (a decode batch's kernel reads them)


def chunk_shape(tiles: AttentionTiles, page: int) -> tuple[int, int, int, int]:
    """(KV positions per chunk of the large path, of the small path, of a decode batch, block-table
    entries a chunk reads), paged K/V.

    A chunk starting anywhere inside a page spans one page more than its length covers, and the
    entry count must be a power of two: a chunk is (entries - 1) pages, cut to whole KV tiles of
    its path. A profile with kv_chunk_tiles == 0 gets (0, 0, 0, 1): the block table is read per KV tile.
    """
    if tiles.kv_chunk_tiles == 0:
        return 0, 0, 0, 1
    widest = max(tiles.kv_tile, tiles.small_kv_tile, tiles.decode_kv_tile)
    pages = max(2, next_power_of_2(-(-tiles.kv_tile * tiles.kv_chunk_tiles // page)))
    while (pages - 1) * page < widest:
        pages *= 2
    span = (pages - 1) * page
    return (span // tiles.kv_tile * tiles.kv_tile, span // tiles.small_kv_tile * tiles.small_kv_tile,
            span // tiles.decode_kv_tile * tiles.decode_kv_tile, pages)


# Shared memory one pipeline stage of the small path may take (a K and a V tile): a 128-wide
# tile of 128-dim bf16 rows. The small path keeps two or three stages in flight, and wider
# elements or heads get a narrower KV tile (fp32, 128-dim heads: 64 positions) so they still fit.
# A decode batch's tile gets half that: the memory variant runs two programs an SM, and a 128-wide
# decode tile of 128-dim rows took the kernel from 113 to 136 KB (one program an SM).
SMALL_STAGE_BYTES = 64 * 1024
DECODE_STAGE_BYTES = 32 * 1024


def fit_small_tile(tiles: AttentionTiles, head_dim: int, elem_bytes: int) -> AttentionTiles:
    """The tiles with the small path's and a decode batch's KV tiles narrowed to their stage bytes.
    Task rows do not change, and split-KV pieces (whole wider tiles) stay whole narrower ones."""
    row_bytes = 2 * next_power_of_2(head_dim) * elem_bytes

    def fit(width: int, budget: int) -> int:
        while width > 16 and width * row_bytes > budget:
            width //= 2
        return width

    small, decode = fit(tiles.small_kv_tile, SMALL_STAGE_BYTES), fit(tiles.decode_kv_tile, DECODE_STAGE_BYTES)
    if (small, decode) == (tiles.small_kv_tile, tiles.decode_kv_tile):
        return tiles
    return dataclasses.replace(tiles, small_kv_tile=small, decode_kv_tile=decode)


def kernel_constexprs(q, k, v, ops: Operands, tiles: AttentionTiles) -> dict:
    """The compile-time arguments of one launch (also what `benchmarks.kernel_registers` compiles)."""
    num_heads, head_dim, dim_v = q.shape[1], q.shape[-1], v.shape[-1]
    num_kv_heads = k.shape[2] if ops.paged else k.shape[1]
    interp = interpreting()
    page = k.shape[1] if ops.paged else 1
    kv_chunk, small_kv_chunk, decode_kv_chunk, chunk_pages = chunk_shape(tiles, page) if ops.paged else (0, 0, 0, 1)
    return dict(
        SMALL_M=tiles.small_rows, LARGE_M=tiles.large_rows, SMALL_N=tiles.small_kv_tile, LARGE_N=tiles.kv_tile,
        BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_DV=max(16, next_power_of_2(dim_v)), HEAD_DIM=head_dim,
        HEAD_DIM_V=dim_v, NUM_HEADS=num_heads, BLOCK_H=next_power_of_2(num_heads), GROUP=num_heads // num_kv_heads,
        PAGED=ops.paged, PAGE=page, CAUSAL=ops.causal,
        HAS_TREE=ops.tree.dim() == 2, MASK_KIND=ops.mask_kind,
        DOT_FP32=interp, IEEE=interp or q.dtype == torch.float32,
        KV_CHUNK=kv_chunk, SMALL_KV_CHUNK=small_kv_chunk, CHUNK_PAGES=chunk_pages,
        DECODE_N=tiles.decode_kv_tile, DECODE_KV_CHUNK=decode_kv_chunk,
        KV_LAYOUT=kv_layout(k, v, ops.paged),
    )


def launch(q, k, v, out, table: torch.Tensor, ops: Operands, scale: float, *, tiles: AttentionTiles,
           profile: TargetProfile, grid: int | None = None):
    """Run the kernel. q/out are [T, Hq, D] (paged) or [B, Hq, S, D] (dense) views with a unit
    last stride; k/v are caches [num_blocks, block_size, Hkv, D] or dense [B, Hkv, L, D]."""
    problem = _scale_problem(scale)
    if problem:
        # the unmasked KV loop takes the row max before scaling (max(s) * scale), right only for scale > 0
        raise ValueError(f"xyserve attention: the kernel needs a positive softmax scale ({problem})")
    tiles = fit_small_tile(tiles, max(q.shape[-1], v.shape[-1]), k.element_size())
    constexprs = kernel_constexprs(q, k, v, ops, tiles)
    dense = not ops.paged
    parts = profile.max_partials
    part = torch.empty(parts, tiles.small_rows, constexprs["BLOCK_DV"], dtype=torch.float32, device=q.device)
    ml = torch.empty(parts, 2, tiles.small_rows, dtype=torch.float32, device=q.device)
    counters = arrival_counters(q.device, parts)  # split-KV pieces' arrivals
    # dense [B, H, S, D] vs packed [T, H, D]: (batch, token, head) strides
    sq = (q.stride(0), q.stride(2), q.stride(1)) if dense else (0, q.stride(0), q.stride(1))
    so = (out.stride(0), out.stride(2), out.stride(1)) if dense else (0, out.stride(0), out.stride(1))
    sk = (k.stride(0), k.stride(2), k.stride(1)) if dense else (k.stride(0), k.stride(1), k.stride(2))
    sv = (v.stride(0), v.stride(2), v.stride(1)) if dense else (v.stride(0), v.stride(1), v.stride(2))
    sm = ops.mask.stride() if ops.mask.dim() == 4 else (0, 0, 0, 0)
    if ops.paged and ops.seq_lens is None:
        raise ValueError("xyserve attention: a paged launch needs seq_lens")
    seq_lens = ops.seq_lens if ops.paged else table
    _LAUNCH((grid or profile.num_programs,),
        table, q, out, k, v, ops.block_table, ops.cu_seqlens_q, seq_lens, ops.tree, ops.mask,
        part, ml, counters,
        ops.num_requests, q.shape[0] if ops.paged else 0, ops.dense_q_len, ops.dense_kv_len, table.numel(),
        ops.block_table.shape[1] if ops.paged else 0, scale * LOG2E,
        *sq, *so, ops.block_table.stride(0) if ops.paged else 0, *sk, *sv,
        ops.tree.stride(0) if ops.tree.dim() == 2 else 0, *sm,
        **constexprs, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def kv_layout(k: torch.Tensor, v: torch.Tensor, paged: bool) -> int:
    """Which K/V strides the kernel may compile in (KV_LAYOUT): 1 whole contiguous paged caches,
    2 dense [B, Hkv, L, D] whose positions are one head-dim apart, 3 dense views of [B, L, Hkv, D]
    (HF's K/V before a cache concatenates them), 0 anything else (run-time strides). Batch strides
    stay run-time values in the dense layouts."""
    if paged:
        return 1 if k.is_contiguous() and v.is_contiguous() else 0
    hkv = k.shape[1]
    if all(t.stride(2) == t.shape[3] for t in (k, v)):
        return 2
    if all(t.stride(1) == t.shape[3] and t.stride(2) == hkv * t.shape[3] for t in (k, v)):
        return 3
    return 0


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale_problem(scale) -> str | None:
    return None if scale is None or scale > 0 else f"softmax scale {scale} <= 0"


def _paged_problem(q, k_cache, v_cache, block_table) -> str | None:
    reason = _runnable(q)
    if reason:
        return reason
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4 or block_table.dim() != 2:
        return "paged attention expects q [T, Hq, D] and caches [num_blocks, block_size, Hkv, D]"
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return "q and the KV caches have different dtypes"
    if q.shape[1] % k_cache.shape[2] or max(q.shape[2], v_cache.shape[3]) > MAX_HEAD_DIM:
        return f"heads {q.shape[1]}/{k_cache.shape[2]} or head dim {q.shape[2]} not supported"
    if any(c.stride(0) != c.shape[1] * c.stride(1) for c in (k_cache, v_cache)):
        return "a KV cache whose blocks are not block_size consecutive rows (the kernel addresses block * block_size + slot)"
    return None


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, tree_mask=None,
                    task_table=None, out=None):
    """Mixed prefill / chunked prefill / decode / verify attention over a paged cache, one launch.

    Planned here (no `task_table`), a batch of prefills on a Hopper GPU runs the Gluon prefill kernel
    instead of the meta-kernel (prefill_hopper.py says when).

    Semantics of reference.paged_attention. `task_table` is a prebuilt table from
    tiling.build_task_table (host or device); without it the table is planned here, which reads
    cu_seqlens_q / seq_lens back to the host.
    """
    problem = _paged_problem(q, k_cache, v_cache, block_table) or _scale_problem(scale)
    if problem:
        _fallback(problem)
        return reference.paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, tree_mask)
    # the variant follows shapes known without a sync; a table planned for the other variant
    # (real vs padded lengths) still gives the same numbers
    profile = profile_for(q.device).for_batch(q.shape[0], seq_lens.shape[0])
    tiles = profile.attention_tiles(q.shape[-1])
    if task_table is None:
        cu = cu_seqlens_q.tolist()
        q_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
        done = prefill_hopper.try_run(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, scale, q_lens, tree_mask, out)
        if done is not None:
            return done
        task_table = plan(q_lens, seq_lens.tolist(), num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2],
                          head_dim=q.shape[-1], profile=profile,
                          causal="none" if tree_mask is not None else "bottom_right").tensor()
    if task_table.device != q.device:
        task_table = task_table.to(q.device, non_blocking=True)
    ops = Operands(
        block_table=block_table.to(torch.int32), cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        tree=tree_mask.view(torch.uint8) if tree_mask is not None else q.new_empty(0, dtype=torch.uint8),
        mask=q.new_empty(0), mask_kind=0, paged=True, causal=True, num_requests=seq_lens.shape[0],
        seq_lens=seq_lens.to(torch.int32),
    )
    q = _unit_last(q)
    if out is None:  # tests pass a NaN-filled `out` to prove every row is written
        out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
    return launch(q, _unit_last(k_cache), _unit_last(v_cache), out, task_table, ops, scale, tiles=tiles, profile=profile)


def _dense_problem(q, k, v, mask, is_causal) -> str | None:
    reason = _runnable(q)
    if reason:
        return reason
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "dense attention expects rank-4 q/k/v"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v have different dtypes"
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return "q/k/v batch, length or head-dim mismatch"
    if q.shape[1] % k.shape[1] or max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"heads {q.shape[1]}/{k.shape[1]} or head dim {q.shape[-1]} not supported"
    if k.shape[2] == 0:
        return "empty KV"
    if mask is not None:
        if is_causal:
            return "both a mask and is_causal"  # SDPA rejects it; let the reference say so
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            return f"mask dtype {mask.dtype}"
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return "mask does not broadcast to [B, Hq, S, L]"
    return None


def _dense_table(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, causal, profile, device):
    """Dense shapes repeat every step: plan once per shape and keep the table on the device."""
    key = (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, causal, profile.name, str(device))
    table = _dense_plans.get(key)
    if table is None:
        table = plan([q_len] * batch, [kv_len] * batch, num_q_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, profile=profile, causal=causal).tensor().to(device)
        if len(_dense_plans) > 256:  # drop the tables no CUDA graph has recorded
            for k in [k for k in _dense_plans if k not in _captured_plans]:
                del _dense_plans[k]
        _dense_plans[key] = table
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a recorded graph reads this table on every replay: it must outlive the graph (Inductor's
        # CUDA graphs plan it in the warm-up run, before capture, so the lookup above finds it)
        _captured_plans.add(key)
    return table


def dense_attention(q, k, v, mask, scale, is_causal, out=None):
    """SDPA semantics (reference.dense_attention): q [B, Hq, S, D], k/v [B, Hkv, L, D(v)], GQA by
    head ratio, `mask` bool (True = keep) or additive float broadcastable to [B, Hq, S, L]."""
    problem = _dense_problem(q, k, v, mask, is_causal) or _scale_problem(scale)
    if problem:
        _fallback(problem)
        return reference.dense_attention(q, k, v, mask, scale, is_causal)
    batch, num_heads, q_len, head_dim = q.shape
    if out is None:  # tests pass a NaN-filled contiguous `out` to prove every row is written
        out = torch.empty(batch, num_heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    profile = profile_for(q.device).for_batch(batch * q_len, batch)
    tiles = profile.attention_tiles(head_dim)
    kind, full_mask = 0, q.new_empty(0)
    if mask is not None:
        full_mask = mask.expand(batch, num_heads, q_len, k.shape[2])  # stride 0 on broadcast dims
        kind = 1 if mask.dtype == torch.bool else 2
        if kind == 1:
            full_mask = full_mask.view(torch.uint8)
    causal = "top_left" if is_causal else "none"
    table = _dense_table(batch, q_len, k.shape[2], num_heads, k.shape[1], head_dim, causal, profile, q.device)
    ops = Operands(block_table=table, cu_seqlens_q=table, tree=q.new_empty(0, dtype=torch.uint8),
                   mask=full_mask, mask_kind=kind, paged=False, causal=is_causal, num_requests=batch,
                   dense_q_len=q_len, dense_kv_len=k.shape[2])
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return launch(_unit_last(q), _unit_last(k), _unit_last(v), out, table, ops, scale, tiles=tiles, profile=profile)
