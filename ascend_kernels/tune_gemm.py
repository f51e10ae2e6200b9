"""Offline SmoothGEMM tuner: `python -m ascend_kernels.tune_gemm --model llama-3-8b`.

For each (N, K) of a model's linears and each M range of gemm_table.M_RANGES, time a short list
of candidate configurations (primitive, tile sizes, group order, split-K, warps, stages, the
persistent stream-K primitive, swap-AB tiles, persistent tiles for large M) at both ends of the range, keep the
Triton config whose worst ratio to the best time is lowest, and time cuBLAS (F.linear) the same
way: where cuBLAS scores better, the range is marked `"dispatch": "cublas"` and smooth_gemm calls
F.linear there.

--incumbent TABLE re-tunes incrementally: the tiled candidates shrink to the config TABLE already
holds for the range (timed again in this run), plus every stream-K, swap-AB and persistent-tile
candidate and cuBLAS. The row-owner GEMV candidates of the M = 1, 2 and 4 ranges are always timed
(a table tuned before they existed holds a tl.dot config there).

The result is merged into ascend_kernels/gemm_tables/<gpu>.json (or --out), which smooth_gemm
reads at run time. Timing: medians of triton.testing.do_bench_cudagraph (the engine replays CUDA
graphs), weights rotated over enough copies to exceed L2 twice, random data.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ascend_kernels.gemm_table import (
    CUBLAS, M_RANGES, ROWS_BLOCK_MS, TABLE_DIR, GemmConfig, device_key, parse_table, table_json,
)  # fmt: skip

# name: (hidden, q heads, kv heads, head_dim, intermediate)
MODELS = {
    "llama-3-8b": (4096, 32, 8, 128, 14336),
    "llama-3.2-1b": (2048, 32, 8, 64, 8192),
}


def model_shapes(name: str) -> dict[str, tuple[int, int]]:
    """{layer: (N, K)} of one decoder layer's linears (fused QKV and gate/up, as servers run them)."""
    hidden, heads, kv_heads, head_dim, inter = MODELS[name]
    return {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o": (hidden, heads * head_dim),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }


def _c(bm, bn, bk, group, split, warps, stages, tma=False, sk=0, persist=0, ws=False) -> GemmConfig:
    return GemmConfig(bm, bn, bk, group, split, warps, stages, tma, sk, persistent=persist, warp_spec=ws)


# Short candidate lists per M regime (pruned with a first full run on an H200: the configs that
# never came within 5% of the best are gone); "tma" ones use tensor-descriptor loads.
_GEMV = [
    _c(16, 16, 512, 1, 1, 4, 4), _c(16, 32, 256, 1, 1, 4, 4), _c(16, 64, 256, 1, 1, 4, 4),
    _c(16, 64, 128, 1, 1, 4, 5), _c(16, 128, 128, 1, 1, 4, 4), _c(16, 32, 256, 1, 2, 4, 4),
    _c(16, 32, 256, 1, 1, 4, 4, True), _c(16, 64, 256, 1, 1, 4, 4, True), _c(16, 128, 128, 1, 1, 4, 4, True),
    _c(16, 64, 256, 1, 2, 4, 4, True),
    # split-K reduced inside the launch (one launch, session 17): more programs, shorter K loops,
    # for the small N x K of 1B-class models
    # (the H100 tune of session 17 kept these within 0.5% of the best somewhere; TMA ones and 8 slices never)
    _c(16, 64, 256, 1, 4, 4, 4), _c(16, 64, 128, 1, 4, 4, 4), _c(16, 128, 128, 1, 4, 4, 4),
]  # fmt: skip
# The row-owner GEMV for M = 1, 2 (block_m = the range's M): (BLOCK_N, BLOCK_K, warps), the ones
# that came within a few % of the best on some Llama shape in an H100 sweep of 30 (session 22).
_ROWS = [(1, 4096, 8), (1, 4096, 4), (1, 2048, 4), (2, 2048, 4), (2, 4096, 4), (2, 4096, 8), (4, 1024, 8),
         (4, 2048, 4), (8, 1024, 8)]  # fmt: skip
# rows4 (gemv_rows_fma.py, M = 3-4): (BLOCK_N, warps); block_k is 256 x warps (one 16-byte load per thread
# and row). The winners of an H100 probe at M = 3 on the Llama shapes (session 25).
_ROWS4 = [(2, 2), (2, 4), (2, 8), (4, 4), (8, 4), (4, 2)]
_SMALL = [
    _c(16, 64, 256, 1, 1, 4, 4), _c(32, 64, 128, 4, 1, 4, 4), _c(32, 128, 128, 4, 1, 4, 4),
    _c(64, 64, 128, 8, 1, 4, 4), _c(64, 128, 64, 8, 1, 4, 4), _c(64, 64, 128, 8, 2, 4, 4),
    _c(16, 64, 256, 1, 1, 4, 4, True), _c(32, 64, 128, 4, 1, 4, 4, True), _c(64, 64, 128, 8, 1, 4, 4, True),
    _c(64, 128, 64, 8, 1, 4, 4, True), _c(32, 64, 128, 4, 4, 4, 4),
]  # fmt: skip
_MID = [
    _c(64, 64, 128, 8, 1, 4, 4), _c(64, 128, 64, 8, 1, 4, 4), _c(128, 64, 64, 8, 1, 4, 4),
    _c(128, 128, 128, 8, 1, 8, 3), _c(64, 64, 128, 8, 1, 4, 4, True), _c(64, 128, 64, 8, 1, 4, 4, True),
    _c(64, 128, 128, 8, 1, 4, 3, True), _c(128, 128, 64, 8, 1, 8, 4, True), _c(128, 256, 64, 8, 1, 8, 3, True),
    _c(64, 256, 64, 8, 1, 8, 3, True), _c(64, 128, 64, 8, 2, 4, 4, True), _c(32, 128, 128, 4, 1, 4, 4, True),
]  # fmt: skip
_LARGE = [
    _c(64, 128, 64, 8, 1, 4, 4), _c(128, 128, 128, 8, 1, 8, 3), _c(128, 256, 64, 8, 1, 8, 3),
    _c(128, 256, 64, 16, 1, 8, 3), _c(128, 256, 64, 8, 1, 8, 3, True), _c(128, 256, 64, 16, 1, 8, 4, True),
    _c(128, 128, 64, 8, 1, 8, 4, True), _c(64, 256, 64, 8, 1, 8, 4, True), _c(128, 128, 128, 8, 1, 8, 3, True),
    _c(64, 128, 64, 8, 1, 4, 4, True),
]  # fmt: skip


# Persistent stream-K (last field: programs per SM). A first H200 run (round 2) showed it wins
# where K is long and tiles are few (Llama down projections, M <= 64), never with 128 x 256 tiles
# (serial reductions of 128 KB partials), and that one 4-warp program per SM cannot keep HBM busy:
# hence small non-TMA tiles, with 2 programs per SM where two fit in shared memory.
_SK_GEMV = [_c(16, 64, 256, 1, 1, 4, 4, False, 1), _c(16, 32, 256, 1, 1, 4, 4, False, 2),
            _c(16, 64, 256, 1, 1, 4, 2, False, 2)]  # fmt: skip
_SK_SMALL = [_c(64, 64, 128, 8, 1, 4, 4, False, 1), _c(64, 64, 128, 8, 1, 4, 3, False, 2),
             _c(32, 64, 128, 4, 1, 4, 4, False, 2), _c(16, 64, 256, 1, 1, 4, 4, False, 1)]  # fmt: skip
_SK_MID = [_c(64, 64, 128, 8, 1, 4, 4, False, 1), _c(64, 64, 128, 8, 1, 4, 3, False, 2),
           _c(64, 128, 64, 8, 1, 4, 4, False, 1), _c(64, 128, 64, 8, 1, 4, 4, False, 2),
           _c(64, 128, 64, 8, 1, 4, 4, True, 2)]  # fmt: skip
_SK_LARGE = [_c(128, 256, 64, 8, 1, 8, 3, True, 1), _c(128, 128, 64, 8, 1, 8, 4, False, 1)]
# Persistent tiles (gemm_persistent.py; one program per SM, whole tiles, TMA stores), large M only:
# the four best of 11 variants at M >= 1000 in an H100 probe (session 23); at M <= 333 every
# variant lost to the tiled primitive (too few tiles, K never split).
_PERSIST_LARGE = [_c(128, 256, 64, 8, 1, 8, 3, True, persist=1), _c(128, 256, 64, 8, 1, 4, 3, True, persist=1, ws=True),
                  _c(128, 128, 64, 8, 1, 4, 4, True, persist=1, ws=True),
                  _c(128, 128, 64, 8, 1, 8, 4, True, persist=1)]  # fmt: skip




def _s(bm, bk, nbuf, split, warps=4) -> GemmConfig:
    """A swap-AB config in the Gluon kernel's terms: block_n = 16 x warps weight rows, nbuf chunks."""
    return GemmConfig(bm, 16 * warps, bk, 1, split, warps, nbuf, True, swap_ab=True)


# Swap-AB tiles (the weight on wgmma's M side; gemm_swap_hopper.py on sm_90): the configs that won
# some point of an H100 probe over 17 <= M <= 512 (session 25). They lost to the tuned table at
# M <= 16 everywhere and rarely beat cuBLAS, but beat the tiled primitive by 10-35% at M = 256-512
# on several shapes.
_SWAP_SMALL = [_s(32, 128, 6, 1), _s(32, 256, 4, 2), _s(64, 128, 6, 1), _s(64, 128, 6, 2), _s(64, 128, 4, 1, 8)]
_SWAP_MID = [_s(128, 64, 8, 1), _s(128, 64, 8, 2), _s(128, 128, 4, 1), _s(128, 128, 4, 2), _s(128, 64, 6, 1, 8)]
_SWAP_LARGE = [_s(128, 64, 8, 1), _s(128, 128, 4, 1), _s(128, 64, 6, 1, 8), _s(128, 64, 6, 2, 8)]


def candidates(m_max: int, incumbent: GemmConfig | None = None) -> list[GemmConfig]:
    """Row-owner (M <= 2), tiled, stream-K, swap-AB (17 <= M <= 512) and persistent-tile (large M)
    candidates of an M range; with an incumbent, it replaces the tiled list."""
    tiled, sk = ((_GEMV, _SK_GEMV) if m_max <= 16 else (_SMALL, _SK_SMALL + _SWAP_SMALL) if m_max <= 64
                 else (_MID, _SK_MID + _SWAP_MID) if m_max <= 256
                 else (_LARGE, _SK_LARGE + _PERSIST_LARGE + (_SWAP_LARGE if m_max <= 512 else [])))  # fmt: skip
    rows = ([_c(4, bn, 256 * w, 1, 1, w, 3) for bn, w in _ROWS4] if m_max == 4 else
            [_c(m_max, bn, bk, 1, 1, w, 3) for bn, bk, w in _ROWS] if m_max in ROWS_BLOCK_MS else [])
    tiled = [incumbent] if incumbent is not None else tiled
    return rows + [c for c in tiled if c not in rows] + [c for c in sk if c not in tiled]


def bench_us(fn, graph: bool = True, rep_ms: int = 10) -> float:
    """Median microseconds per call of `fn`. graph=True: many calls captured in one CUDA graph
    (how the engine runs; no launch gaps); False: eager calls, L2 flushed before each one."""
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if graph:
        return 1e3 * tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    return 1e3 * tt.do_bench(fn, warmup=5, rep=2 * rep_ms, return_mode="median")


def _rotation(n: int, k: int, dtype: torch.dtype) -> int:
    """Copies of the weight so that one pass over them exceeds L2 twice (no warm-cache timings)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if torch.cuda.is_available() else 0
    return max(1, min(16, math.ceil(2 * l2 / (n * k * dtype.itemsize))))


def time_config(cfg, xs, ws, rep_ms: int = 10) -> float:
    """Median microseconds of one smooth_gemm call (cfg CUBLAS: F.linear), or inf when the config
    cannot run here."""
    from ascend_kernels.gemm import smooth_gemm

    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % len(ws)
        if cfg.cublas:
            torch.nn.functional.linear(xs[i], ws[i])
        else:
            smooth_gemm(xs[i], ws[i], None, False, config=cfg)

    try:
        return bench_us(call, rep_ms=rep_ms)
    except Exception as exc:  # out of shared memory / registers on this card: not a candidate
        print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        torch.cuda.synchronize()
        return math.inf


def _range_ms(lo: int, m_max: int) -> list[int]:
    """M values timed for the range (lo, m_max]: both ends, since tile quantisation makes the
    best config at the top (e.g. 128 x 256 at M=192) a poor one at the bottom (M=129)."""
    return sorted({m_max, max(lo + 1, m_max // 2 + 1)}) if lo >= 16 else [m_max]


def _pick(configs: list[GemmConfig], times: dict[int, list[float]]) -> tuple[int, list[float]]:
    """Index of the config with the lowest worst-case ratio to the best time at each M, and scores."""
    best = {m: min(t) for m, t in times.items()}
    score = [max(times[m][i] / best[m] for m in times) for i in range(len(configs))]
    return min(range(len(score)), key=score.__getitem__), score


def tune_range(n, k, lo, m_max, ws, dtype, incumbent, rep_ms, log) -> tuple[int, GemmConfig, bool]:
    """One table row: (m_max, best Triton config, cuBLAS faster on this range)."""
    from ascend_kernels.gemm import smooth_gemm

    configs = candidates(m_max, incumbent) + [CUBLAS]
    ms = _range_ms(lo, m_max)
    times = {}
    for m in ms:
        xs = [torch.randn(m, k, dtype=dtype, device="cuda") for _ in ws]
        times[m] = [time_config(cfg, xs, ws, rep_ms) for cfg in configs]
    i_tri, score = _pick(configs[:-1], {m: t[:-1] for m, t in times.items()})
    i_all, score_all = _pick(configs, times)
    best, use_cublas = configs[i_tri], configs[i_all].cublas
    ref = torch.nn.functional.linear(xs[0].float(), ws[0].float())
    err = ((smooth_gemm(xs[0], ws[0], None, False, config=best).float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"tuned config {best} is wrong for N={n} K={k} M={m_max}: rel err {err}")
    log.append({"n": n, "k": k, "m_range": [lo + 1, m_max], "timed_at": ms, "score": score[i_tri],
                "us": {m: times[m][i_tri] for m in ms}, "config": best.to_dict(), "rel_err": err,
                "cublas_us": {m: times[m][-1] for m in ms}, "dispatch": "cublas" if use_cublas else "triton",
                "all": [(c.to_dict(), {m: times[m][i] for m in ms}) for i, c in enumerate(configs)]})  # fmt: skip
    us = " ".join(f"M={m}:{times[m][i_tri]:.1f}us/cuBLAS {times[m][-1]:.1f}us" for m in ms)
    print(f"N={n:6d} K={k:6d} M in ({lo},{m_max}]: {us} (x{score[i_tri]:.2f} of best) "
          f"{best.primitive} {best}{' -> cuBLAS' if use_cublas else ''}", flush=True)  # fmt: skip
    return m_max, best, use_cublas


def tune_shape(n: int, k: int, dtype: torch.dtype, log: list, incumbents=(), rep_ms: int = 10) -> list:
    """Rows (m_max, config, cublas) for every M range of one weight shape."""
    ws = [torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5 for _ in range(_rotation(n, k, dtype))]
    rows, lo = [], 0
    for m_max in M_RANGES:
        incumbent = next((cfg for top, cfg, _ in incumbents if m_max <= top), None)
        rows.append(tune_range(n, k, lo, m_max, ws, dtype, incumbent, rep_ms, log))
        lo = m_max
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS), required=True)
    parser.add_argument("--out", type=Path, default=None, help="table path (default: the shipped table)")
    parser.add_argument("--log", type=Path, default=None, help="write every timing here (JSON)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--incumbent", type=Path, default=None,
                        help="a table whose config per range replaces the tiled candidates (incremental re-tune)")
    parser.add_argument("--rep-ms", type=int, default=10, help="do_bench_cudagraph rep (ms) per timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tuning needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    gpu = device_key()
    out = args.out or TABLE_DIR / f"{gpu}.json"
    shapes = {}
    if out.is_file():  # merge: keep shapes of other models tuned earlier
        shapes = {key: list(rows) for key, rows in parse_table(json.loads(out.read_text())).items()}
    pairs = sorted({nk for model in args.model for nk in model_shapes(model).values()})
    incumbents = parse_table(json.loads(args.incumbent.read_text())) if args.incumbent else {}
    log: list = []
    start = time.time()
    meta = {"dtype": args.dtype, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "device_name": torch.cuda.get_device_name(), "models": sorted(args.model),
            "timing": f"do_bench_cudagraph median (rep {args.rep_ms} ms), weights rotated past L2",
            "candidates": f"incumbent {args.incumbent.name} + stream-K + cuBLAS" if args.incumbent
            else "full tiled list + stream-K + cuBLAS"}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, k in pairs:  # the table is rewritten after each shape: an interrupted run still leaves one
        shapes[(n, k)] = tune_shape(n, k, dtype, log, incumbents.get((n, k), ()), args.rep_ms)
        out.write_text(json.dumps(table_json(gpu, shapes, meta), indent=1) + "\n")
        if args.log:
            args.log.write_text(json.dumps(log, indent=1))
    print(f"wrote {out} ({len(pairs)} shapes, {time.time() - start:.0f} s)")
    return {"table": str(out), "log": log}


if __name__ == "__main__":
    main()
