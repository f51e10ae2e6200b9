"""Per-target tile sizes and core counts for the meta-attention kernel and its planner.

A profile answers two questions: how many persistent programs one launch runs (cores x programs
per core), and which tile shapes the kernel is compiled with for a head dim. The planner cuts
query rows with the same numbers, so a Task-Table is only valid for the profile that built it.

Query tiles count *rows*, not tokens: a row is one (query token, query head of the GQA group)
pair, so a decode token of a group of 4 heads fills 4 rows and K/V are read once per group.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(slots=True, frozen=True)
class AttentionTiles:
    """Tile shapes of one compiled kernel (all constexprs of the launch)."""

    small_rows: int  # decode / short verify path (BLOCK_M of the small path)
    large_rows: int  # prefill / long verify path (BLOCK_M of the large path)
    kv_tile: int  # BLOCK_N of the large path: KV positions per inner step
    num_warps: int
    num_stages: int
    small_kv_tile: int = 0  # BLOCK_N of the small path (memory bound: wider tiles, more bytes in flight); 0 = kv_tile
    kv_chunk_tiles: int = 64  # paged: large-path KV tiles per block-table read (0: one read per tile)
    decode_kv_tile: int = 0  # BLOCK_N of a decode batch (tiling.py's decode_requests); 0 = small_kv_tile

    def __post_init__(self) -> None:
        if self.small_kv_tile == 0:
            object.__setattr__(self, "small_kv_tile", self.kv_tile)
        if self.decode_kv_tile == 0:
            object.__setattr__(self, "decode_kv_tile", self.small_kv_tile)
        for name in ("small_rows", "large_rows", "kv_tile", "small_kv_tile", "decode_kv_tile"):
            value = getattr(self, name)
            # tl.dot needs every dimension to be a power of two of at least 16.
            if value < 16 or value & (value - 1):
                raise ValueError(f"xyserve: {name} must be a power of two >= 16, got {value}")
        if self.kv_chunk_tiles < 0:
            raise ValueError(f"xyserve: kv_chunk_tiles must be >= 0, got {self.kv_chunk_tiles}")
        if self.small_rows > self.large_rows:
            raise ValueError("xyserve: small_rows must not exceed large_rows")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError("xyserve: num_warps must be a power of two <= 16 and num_stages >= 1")


@dataclass(slots=True, frozen=True)
class TargetProfile:
    """One hardware target.

    num_cores:          SMs (GPU) or AI cores (Ascend); programs_per_core multiplies it.
    verify_max_tokens:  q_len up to which a request of unknown stage is treated as a verify.
    min_split_kv:       shortest KV range worth a split-KV piece (split-KV pays a merge).
    max_splits:         most pieces one task is cut into.
    split_pieces_per_program: a split piece aims at 1/this of a program's fair share of work,
                        so the round robin can still even out the pieces.
    split_budget:       most split pieces per launch, in units of programs (bounds the workspace).
    memory_overrides:   field values of the memory-bound variant (decode / verify batches: small
                        tiles, fewer warps, more programs per core); see for_batch.
    memory_tokens_per_request: a batch with at most this many query tokens per request on
                        average runs the memory-bound variant.
    kv_chunk_tiles:     paged K/V: large-path KV tiles per read of the block table (the kernel
                        drains its load pipeline once per chunk; H200, 4 x 2048 prefill:
                        16 tiles 530 us, 32 tiles 506 us, 64 tiles 494 us). 0 reads the block
                        table per KV tile and needs no `tl.gather` (a portable fallback).
    decode_kv_tile:     KV tile of a decode batch (one program per request and kv head over its
                        whole KV, tiling.py); 0 takes the small path's.
    buffer_limits:      on-chip buffer sizes in bytes a tile set must fit (Ascend), else empty.
    tested:             False where the numbers were never run on the hardware.
    """

    name: str
    num_cores: int
    programs_per_core: int = 1
    verify_max_tokens: int = 16
    min_split_kv: int = 256
    max_splits: int = 32
    split_pieces_per_program: int = 1
    split_budget: int = 4
    memory_overrides: tuple[tuple[str, int], ...] = ()
    memory_tokens_per_request: int = 8
    large_rows: int = 128
    kv_tile: int = 64
    small_kv_tile: int = 0
    num_warps: int = 8
    num_stages: int = 3
    kv_chunk_tiles: int = 64
    decode_kv_tile: int = 0
    buffer_limits: tuple[tuple[str, int], ...] = ()
    tested: bool = True

    def __post_init__(self) -> None:
        if self.num_cores < 1 or self.programs_per_core < 1:
            raise ValueError("xyserve: a profile needs at least one core and one program per core")
        if self.min_split_kv < 1 or self.max_splits < 1 or self.split_budget < 0:
            raise ValueError("xyserve: split-KV limits must be positive")
        AttentionTiles(16, self.large_rows, self.kv_tile, self.num_warps, self.num_stages, self.small_kv_tile,
                       self.kv_chunk_tiles)
        for head_dim in (64, 128, 256):
            self.check_fits(self.attention_tiles(head_dim), head_dim, elem_bytes=2)

    def for_batch(self, num_tokens: int, num_requests: int) -> "TargetProfile":
        """The variant a batch runs: memory-bound batches (decode / verify) get the memory variant.

        Only shapes known on the host without a device sync decide (the launcher sees padded
        shapes, the planner real ones); a table planned for the other variant still gives the same
        numbers, only its balance differs.
        """
        if self.memory_overrides and num_tokens <= self.memory_tokens_per_request * max(1, num_requests):
            return _memory_variant(self)
        return self

    @property
    def num_programs(self) -> int:
        return self.num_cores * self.programs_per_core

    @property
    def max_partials(self) -> int:
        """Split-KV pieces one launch may hold (the merge workspace is sized by it), the same for
        both variants so a table planned for either fits the workspace."""
        per_core = max(self.programs_per_core, dict(self.memory_overrides).get("programs_per_core", 1))
        return self.split_budget * self.num_cores * per_core

    def attention_tiles(self, head_dim: int) -> AttentionTiles:
        """Tiles for a head dim: wide heads get half the rows and KV tile so registers still fit."""
        return _attention_tiles(self, head_dim)

    def _tiles(self, head_dim: int) -> AttentionTiles:
        block_d = next_power_of_2(head_dim)
        shrink = 2 if block_d >= 256 else 1
        large = max(16, self.large_rows // shrink)
        kv = max(16, self.kv_tile // shrink)
        small_kv = max(16, (self.small_kv_tile or self.kv_tile) // shrink)
        decode_kv = max(16, self.decode_kv_tile // shrink) if self.decode_kv_tile else 0
        return AttentionTiles(16, large, kv, self.num_warps, self.num_stages, small_kv, self.kv_chunk_tiles, decode_kv)

    def check_fits(self, tiles: AttentionTiles, head_dim: int, elem_bytes: int) -> None:
        """Raise if a tile set overflows a named on-chip buffer (only profiles that list them)."""
        limits = dict(self.buffer_limits)
        if not limits:
            return
        d = next_power_of_2(head_dim)
        m, n = tiles.large_rows, max(tiles.kv_tile, tiles.small_kv_tile)
        need = {
            "L0A": m * d * elem_bytes,  # left GEMM operand: the Q tile (then P)
            "L0B": n * d * elem_bytes,  # right GEMM operand: the K tile (then V)
            "L0C": max(m * n, m * d) * 4,  # fp32 GEMM result: scores or the P.V update
            "UB": (m * d + 3 * m * n + 2 * m) * 4,  # vector unit: acc, scores/probs, m and l
        }
        for buf, size in need.items():
            if buf in limits and size > limits[buf]:
                raise ValueError(
                    f"xyserve: profile {self.name}: {buf} needs {size} B for rows={m} kv={n} d={d}, "
                    f"limit {limits[buf]} B"
                )


# Every eager attention call asks for its variant and tiles: built once per profile, not per call
# (dataclass construction with its checks was ~100 us of a dense call's host time).
@functools.cache
def _memory_variant(profile: TargetProfile) -> TargetProfile:
    return dataclasses.replace(profile, memory_overrides=(), **dict(profile.memory_overrides))


@functools.cache
def _attention_tiles(profile: TargetProfile, head_dim: int) -> AttentionTiles:
    return profile._tiles(head_dim)


KB = 1024

# H100 SXM and H200 share the GH100 die: 132 SMs. Measured on an H200 (bench_attention.py): the
# compute variant (8 warps, 128-row tiles, ~226 registers: one program per SM) is best for
# prefill and mixed batches; 4 warps with 64-row tiles (two programs per SM) move decode-only
# batches 1.4x faster. Their small path takes 64-wide KV tiles since it reads block ids per chunk
# (64 decodes of 0.5-4k: 170 us, 197 with 128-wide tiles); the compute variant keeps 128-wide
# ones for the decodes of a mixed batch (357 vs 382 us with 64). A decode batch (whole KV per
# program, no task walk) streams faster with 128-wide tiles: 16 decodes of 1,000 positions 19.2 ->
# 16.1 us a layer, 32 of 2,000 37.8 -> 35.7, 16 of 129-256 7.59 -> 7.73 (H200, 16 layers a graph).
_GH100_MEMORY = (("num_warps", 4), ("large_rows", 64), ("programs_per_core", 2), ("small_kv_tile", 64),
                 ("decode_kv_tile", 128))
H100 = TargetProfile(name="h100", num_cores=132, small_kv_tile=128, memory_overrides=_GH100_MEMORY)
H200 = TargetProfile(name="h200", num_cores=132, small_kv_tile=128, memory_overrides=_GH100_MEMORY)
# The CPU interpreter runs programs one after the other: few programs and tiny tiles keep
# tests fast while still exercising the persistent loop and the round robin.
CPU_INTERPRETER = TargetProfile(
    name="cpu-interpreter", num_cores=4, min_split_kv=32, large_rows=32, kv_tile=16, num_warps=4, num_stages=1,
    kv_chunk_tiles=4,
    memory_overrides=(("large_rows", 16), ("programs_per_core", 2)),
)
# Ascend 910B: 24 AI cores (20 on some SKUs), each a 16x16x16 cube unit with 64 KB L0A/L0B,
# 128 KB L0C and 192 KB unified buffer for the vector units. UNTESTED on hardware: the tile
# sizes are only checked against those buffer sizes.
ASCEND_910B = TargetProfile(
    name="ascend-910b",
    num_cores=24,
    large_rows=128,
    kv_tile=64,
    num_warps=4,
    num_stages=2,
    kv_chunk_tiles=0,  # no tl.gather on the untested target: the block table is read per KV tile
    buffer_limits=(("L0A", 64 * KB), ("L0B", 64 * KB), ("L0C", 128 * KB), ("UB", 192 * KB)),
    tested=False,
)

PROFILES = {p.name: p for p in (H100, H200, CPU_INTERPRETER, ASCEND_910B)}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _cuda_profile(index: int) -> TargetProfile:
    props = torch.cuda.get_device_properties(index)
    name = props.name.lower()
    if "h200" in name:
        return H200
    if "h100" in name:
        return H100
    return TargetProfile(name=f"cuda-{props.name}", num_cores=props.multi_processor_count, tested=False)


def profile_for(device: torch.device | str | None = None) -> TargetProfile:
    """The profile of a device; the interpreter profile for CPU tensors or TRITON_INTERPRET."""
    env = os.environ.get("XYSERVE_ATTENTION_PROFILE")
    if env:
        return PROFILES[env]
    device = torch.device(device) if device is not None else None
    if interpreting() or device is None or device.type == "cpu":
        return CPU_INTERPRETER
    if device.type == "npu":
        return ASCEND_910B
    if device.type == "cuda":
        return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_INTERPRETER
