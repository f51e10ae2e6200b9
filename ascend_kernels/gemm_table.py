"""SmoothGEMM tile configurations: the fixed set of primitives and the tuned lookup table.

A table (ascend_kernels/gemm_tables/<gpu>.json, written by `python -m ascend_kernels.tune_gemm`)
maps a weight shape "NxK" to a list of M ranges, each with its fastest Triton primitive and,
where the tuner measured cuBLAS faster on that range, `"dispatch": "cublas"`::

    {"gpu": "nvidia-h100-80gb-hbm3", "dtype": "bfloat16",
     "shapes": {"6144x4096": [{"m_max": 16, "config": {"block_m": 16, ...}},
                              {"m_max": 192, "config": {...}, "dispatch": "cublas"}, ...]}}

The run-time lookup is a dict read (tables are loaded once). M only picks the range, so a new M
never changes the constexprs, hence never compiles a new kernel. A cuBLAS range is served by
F.linear unless the caller forbids it (allow_cublas=False), then by the stored Triton config.
A shape no table covers on a GPU goes to F.linear too (allow_cublas=False: `default_config`):
untuned Triton tiles are no sane default there (0.68x of cuBLAS, geometric mean of the Llama
sweep on an H100 before its table existed). The CPU interpreter ('cpu') runs the Triton default.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

TABLE_DIR = Path(__file__).with_name("gemm_tables")

# The primitives: the only BLOCK_M values a kernel is ever compiled with. 1, 2 and 4 are the row-owner
# GEMV (gemv_rows.py, and gemv_rows_fma.py for 4 on NVIDIA GPUs: no tensor cores, for up to four
# tokens); 16 is the tl.dot GEMV (decode / small verify batches, split-K allowed); the others are tiled
# GEMMs.
ROWS_BLOCK_MS = (1, 2, 4)
BLOCK_MS = (*ROWS_BLOCK_MS, 16, 32, 64, 128)
# Upper ends of the M ranges the tuner tunes and the table stores (the last one is open-ended).
# Tables tuned before a row-owner range existed serve its M from the next range up (lookup).
M_RANGES = (1, 2, 4, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(slots=True, frozen=True)
class GemmConfig:
    """One tile primitive with its tuned knobs (all become Triton constexprs / launch options)."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8  # tiles of GROUP_M rows share a weight column panel in L2 (swizzle)
    split_k: int = 1  # >1: K is cut into SPLIT_K slices; the last slice of a tile to finish sums them
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # load through tensor descriptors where the GPU has a copy engine (Hopper+)
    # >0: the persistent stream-K primitive (gemm_streamk.py) with stream_k programs per core;
    # split_k and the grid then no longer apply: the programs share the real tiles' K iterations.
    stream_k: int = 0
    cublas: bool = False  # not a Triton primitive: F.linear (the other fields are ignored)
    # >0: the persistent-tiles primitive (gemm_persistent.py) with `persistent` programs per core,
    # each walking whole tiles through descriptors (needs tma); warp_spec: Triton's automatic warp
    # specialisation of its tile loop.
    persistent: int = 0
    warp_spec: bool = False
    # the tiled primitive accumulating out^T (gemm_loops.mma): weight rows on the MMA's M side, so a
    # few tokens still run Hopper's warpgroup MMA; block_m is then the MMA's N (16-128 tokens)
    swap_ab: bool = False

    def __post_init__(self) -> None:
        if self.block_m not in BLOCK_MS:
            raise ValueError(f"SmoothGEMM: block_m must be one of {BLOCK_MS}, got {self.block_m}")
        for name in ("block_n", "block_k", "group_m", "split_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"SmoothGEMM: {name} must be a power of two, got {getattr(self, name)}")
        if self.rows:
            if self.split_k != 1 or self.stream_k or self.tma:
                raise ValueError("SmoothGEMM: the row-owner GEMV (block_m 1, 2, 4) has no split-K, stream-K or TMA form")
        elif self.block_n < 16 or self.block_k < 16:
            raise ValueError("SmoothGEMM: block_n and block_k must be >= 16 (tl.dot minimum)")
        if self.num_stages < 1:
            raise ValueError("SmoothGEMM: num_stages must be >= 1")
        if not 0 <= self.stream_k <= 8:
            raise ValueError(f"SmoothGEMM: stream_k (programs per core) must be in 0..8, got {self.stream_k}")
        if self.stream_k and self.split_k != 1:
            raise ValueError("SmoothGEMM: stream-K splits K itself; split_k must be 1")
        if not 0 <= self.persistent <= 8:
            raise ValueError(f"SmoothGEMM: persistent (programs per core) must be in 0..8, got {self.persistent}")
        if self.persistent and (self.rows or self.split_k != 1 or self.stream_k or not self.tma):
            raise ValueError("SmoothGEMM: persistent tiles are tl.dot tiles through descriptors (tma), "
                             "without split-K or stream-K")
        if self.warp_spec and not self.persistent:
            raise ValueError("SmoothGEMM: warp_spec applies to the persistent-tiles primitive only")
        if self.swap_ab and (self.rows or self.stream_k or self.persistent):
            raise ValueError("SmoothGEMM: swap_ab is a form of the tiled tl.dot primitive only")

    @property
    def rows(self) -> bool:
        """The row-owner GEMV (gemv_rows.py) rather than a tl.dot primitive."""
        return not self.cublas and self.block_m in ROWS_BLOCK_MS

    @property
    def primitive(self) -> str:
        if self.cublas:
            return "cublas"
        if self.rows:
            return f"rows{self.block_m}"
        name = ("gemv16" if self.block_m == 16 else f"tile{self.block_m}") + ("-tma" if self.tma else "")
        if self.persistent:
            name += f"-p{self.persistent}" + ("-ws" if self.warp_spec else "")
        if self.swap_ab:
            name += "-swap"
        return name + (f"-sk{self.stream_k}" if self.stream_k else "")

    def to_dict(self) -> dict:
        return asdict(self)

    def fitted(self, n: int, k: int) -> "GemmConfig":
        """Shrink N/K tiles for tiny weights (tests); depends on the weight only, never on M."""
        least = 1 if self.rows else 16  # tl.dot needs 16
        bn = max(least, min(self.block_n, _next_pow2(n)))
        bk = max(least, min(self.block_k, _next_pow2(k)))
        split = max(1, min(self.split_k, -(-k // bk)))
        if self.cublas or (bn, bk, split) == (self.block_n, self.block_k, self.split_k):
            return self
        return GemmConfig(
            self.block_m, bn, bk, self.group_m, _prev_pow2(split), self.num_warps, self.num_stages, self.tma,
            self.stream_k, persistent=self.persistent, warp_spec=self.warp_spec, swap_ab=self.swap_ab,
        )


CUBLAS = GemmConfig(cublas=True)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _prev_pow2(v: int) -> int:
    return 1 << (v.bit_length() - 1)


def default_config(m: int) -> GemmConfig:
    """The Triton config where no table covers the shape (no tuning run on this card yet) and
    cuBLAS is not an option: the CPU interpreter, or allow_cublas=False."""
    if m <= 16:
        return GemmConfig(block_m=16, block_n=32, block_k=256, group_m=1, num_warps=4, num_stages=4)
    if m <= 32:
        return GemmConfig(block_m=32, block_n=64, block_k=128, group_m=4, num_warps=4, num_stages=4)
    if m <= 128:
        return GemmConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4)
    return GemmConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def normalize_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the table file's stem)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def device_key(device_index: int = -1) -> str:
    """The table name of a CUDA device; 'cpu' where there is none (the Triton interpreter)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    index = torch.cuda.current_device() if device_index < 0 else device_index
    return normalize_gpu_name(torch.cuda.get_device_name(index))


# One tuned M range: (m_max, best Triton config, whether cuBLAS was faster there).
Entry = tuple[int, GemmConfig, bool]


@functools.cache
def load_table(gpu: str) -> dict[tuple[int, int], tuple[Entry, ...]]:
    """{(N, K): ((m_max, config, cublas), ...) sorted by m_max}; empty when no table ships for this GPU."""
    path = TABLE_DIR / f"{gpu}.json"
    if not path.is_file():
        return {}
    return parse_table(json.loads(path.read_text()))


def parse_table(data: dict) -> dict[tuple[int, int], tuple[Entry, ...]]:
    """Tables written before cuBLAS was a candidate have no "dispatch" key: all Triton."""
    table = {}
    for shape, rows in data.get("shapes", {}).items():
        n, k = (int(v) for v in shape.split("x"))
        entries = [(int(r["m_max"]), GemmConfig(**r["config"]), r.get("dispatch") == "cublas") for r in rows]
        table[(n, k)] = tuple(sorted(entries, key=lambda e: e[0]))
    return table


def lookup(n: int, k: int, m: int, gpu: str, allow_cublas: bool = True, itemsize: int = 2) -> GemmConfig:
    """The config for an [m, k] x [k, n] product: first tuned range whose m_max >= m (the last
    range serves any larger M); CUBLAS where the tuner found cuBLAS faster and it is allowed, and
    for an untuned shape on a GPU. Tables are tuned on 16-bit operands: 4-byte ones (fp32) need
    twice the shared memory per tile, which the big tuned tiles do not have, so on a GPU they are
    treated as untuned."""
    entries = load_table(gpu).get((n, k)) if itemsize <= 2 or gpu == "cpu" else None
    if not entries:
        return CUBLAS if allow_cublas and gpu != "cpu" else default_config(m)
    entry = next((e for e in entries if m <= e[0]), entries[-1])
    return CUBLAS if entry[2] and allow_cublas else entry[1]


def table_json(gpu: str, shapes: dict[tuple[int, int], list[Entry]], meta: dict) -> dict:
    """The JSON document for `shapes` ({(N, K): [(m_max, config[, cublas]), ...]})."""

    def row(m_max: int, cfg: GemmConfig, cublas: bool = False) -> dict:
        return {"m_max": m_max, "config": cfg.to_dict(), **({"dispatch": "cublas"} if cublas else {})}

    return {
        "gpu": gpu,
        **meta,
        "shapes": {
            f"{n}x{k}": [row(*e) for e in sorted(rows, key=lambda e: e[0])] for (n, k), rows in sorted(shapes.items())
        },
    }
