"""How far could any kernel beat cuBLAS on bench_gemm's points? A measured upper bound.

    python -m benchmarks.gemm_bound [--out DIR] [--rep-ms MS] [--quick]

The roofline floor of bench_gemm (bytes / copy bandwidth, FLOPs / cuBLAS peak) ignores what a
standalone kernel pays besides its bytes: the launch, the ramp to full bandwidth and the tail. This
measures that directly. For every byte count of bench_gemm's points, a kernel that does nothing but
stream those bytes (and writes one float per program) is timed over a sweep of grids, tile sizes
and warps, the same way bench_gemm times a GEMM: in a CUDA graph, with copies rotated past L2.
Any GEMM of that point reads at least those bytes, so

    bound(point) = max(1, cuBLAS / max(best read time, FLOPs / cuBLAS peak))

is the most a dispatcher (which may always pick cuBLAS) can gain there, and the geometric mean of
the bounds is the most any SmoothGEMM can reach on issue 4's geomean. The bound is optimistic: a
GEMM also multiplies, reads its activations once per N tile, and must do both at once.

    stream:  src = [copies][numel] bf16, one copy per call (rotated past L2)
             program p reads src[p * chunk : (p + 1) * chunk] in BLOCK pieces, writes out[p]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ascend_kernels.tune_gemm import bench_us, model_shapes  # noqa: E402
from benchmarks.bench_gemm import M_BANDS, M_POINTS, MODELS, QUICK_M, ceilings  # noqa: E402

REP_MS = 5
# (BLOCK elements, warps, programs per SM, strided): the read sweep. More programs per SM keep more
# loads in flight; fewer, longer programs pay less launch and tail. Programs per SM 0 = one program
# per BLOCK (the grid covers the bytes in waves, as a GEMV's tiles do). Strided programs read
# blocks p, p + programs, ... (neighbours read neighbouring blocks); the others one contiguous chunk.
READ_CONFIGS = [(b, w, g, st) for b in (4096, 8192) for w in (4, 8)
                for g, st in ((4, False), (8, False), (4, True), (8, True), (0, False))]  # fmt: skip
BIG_READ_CONFIGS = [(b, w, g, st) for b in (8192, 16384) for w in (4, 8)
                    for g, st in ((2, True), (4, True), (0, False))]  # over 100 MB  # fmt: skip
BUCKET = 1.03  # byte counts within 3% share one read sweep, run at the bucket's smallest count


@triton.jit
def stream_read_kernel(
    src_ptr,  # [numel] bf16: the bytes to stream
    out_ptr,  # [num_programs] fp32: one sum per program (keeps the loads live)
    numel,
    chunk,  # elements per program, a multiple of BLOCK (contiguous programs only)
    BLOCK: tl.constexpr,
    STRIDED: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if STRIDED:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(pid.to(tl.int64) * BLOCK, numel, step):
            idx = start + offs
            acc += tl.load(src_ptr + idx, mask=idx < numel, other=0.0).to(tl.float32)
    else:
        start = pid.to(tl.int64) * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + offs
            acc += tl.load(src_ptr + idx, mask=idx < numel, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_read(src: torch.Tensor, out: torch.Tensor, block: int, warps: int, strided: bool = False) -> None:
    """Sum src into len(out) programs' floats: contiguous chunks, or (strided) every programs-th block."""
    if src.dim() != 1 or not src.is_contiguous():
        raise ValueError(f"stream_read wants a contiguous 1-D tensor, got shape {tuple(src.shape)}")
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() == 0:
        raise ValueError("stream_read writes one float32 per program: out must be a non-empty 1-D float32 tensor")
    programs = out.numel()
    chunk = triton.cdiv(triton.cdiv(src.numel(), programs), block) * block
    stream_read_kernel[(programs,)](src, out, src.numel(), chunk, BLOCK=block, STRIDED=strided, num_warps=warps)


@triton.jit
def empty_kernel(out_ptr):  # [1] fp32, never written: a launch with no work
    pass


def read_floor(nbytes: int, sms: int, copies: int) -> dict:
    """Best time (us) of stream_read over READ_CONFIGS for nbytes, copies rotated past L2."""
    numel = nbytes // 2
    srcs = [torch.randn(numel, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    best = {"us": math.inf, "bytes": nbytes}
    for block, warps, per_sm, strided in READ_CONFIGS if nbytes <= 1e8 else BIG_READ_CONFIGS:
        blocks = triton.cdiv(numel, block)
        programs = min(sms * per_sm, blocks) if per_sm else blocks
        out = torch.empty(programs, device="cuda", dtype=torch.float32)
        state = {"i": 0}

        def call():
            i = state["i"] = (state["i"] + 1) % copies
            stream_read(srcs[i], out, block, warps, strided)

        us = bench_us(call, rep_ms=REP_MS)
        if us < best["us"]:
            best = {"us": us, "bytes": nbytes, "block": block, "warps": warps, "programs": programs,
                    "strided": strided}  # fmt: skip
    return best


def cublas_us(n: int, k: int, m: int, copies: int) -> float:
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % copies
        F.linear(xs[i], ws[i])

    return bench_us(call, rep_ms=REP_MS)


def _nbytes(n: int, k: int, m: int) -> int:
    return 2 * (m * k + n * k + m * n)


def _point(model: str, layer: str, n: int, k: int, m: int, read: dict, ceil: dict) -> dict:
    """One point: cuBLAS (mean of two timings) against the read floor and the roofline floor."""
    copies = _copies(2 * n * k)
    cublas = (cublas_us(n, k, m, copies) + cublas_us(n, k, m, copies)) / 2
    nbytes = _nbytes(n, k, m)
    compute_us = 2 * m * n * k / ceil["mm_TFLOPs"] / 1e6
    floor_us = max(nbytes / ceil["bw_GBps"] / 1e3, compute_us)
    p = {"model": model, "layer": layer, "n": n, "k": k, "m": m, "bytes": nbytes, "cublas_us": cublas,
         "floor_us": floor_us, "read_us": read["us"], "read_config": read,
         "read_of_bw": read["bytes"] / read["us"] / 1e3 / ceil["bw_GBps"],
         "bound": max(1.0, cublas / max(read["us"], compute_us)), "roofline_bound": max(1.0, cublas / floor_us)}  # fmt: skip
    print(f"{model:13s} {layer:8s} M={m:5d} cuBLAS {cublas:8.1f} us  read {read['us']:8.1f} us "
          f"({100 * p['read_of_bw']:3.0f}% of copy BW)  bound {p['bound']:.2f}x", flush=True)  # fmt: skip
    return p


def _copies(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(16, math.ceil(2 * l2 / nbytes)))


def _geomean(values: list) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ceil = ceilings()
    dummy = torch.empty(1, device="cuda")
    launch_us = bench_us(lambda: empty_kernel[(sms,)](dummy), rep_ms=REP_MS)
    shapes = [(model, layer, n, k, m) for model in MODELS for layer, (n, k) in model_shapes(model).items()
              for m in (QUICK_M if quick else M_POINTS)]  # fmt: skip
    buckets: dict[int, int] = {}
    for *_, n, k, m in shapes:
        b = _nbytes(n, k, m)
        key = round(math.log(b, BUCKET))
        buckets[key] = min(buckets.get(key, b), b)
    # Reading fewer bytes than the point needs can only make the bound more generous.
    reads = {key: read_floor(b, sms, _copies(b)) for key, b in sorted(buckets.items())}
    points = [_point(*shape, reads[round(math.log(_nbytes(*shape[2:]), BUCKET))], ceil) for shape in shapes]
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "ceilings": ceil, "launch_us": launch_us, "points": points, "summary": summarize(points)}  # fmt: skip


def summarize(points: list) -> dict:
    out = {"bound_geomean": _geomean([p["bound"] for p in points]),
           "roofline_bound_geomean": _geomean([p["roofline_bound"] for p in points]),
           "small_m_read_of_bw_min": min((p["read_of_bw"] for p in points if p["m"] <= 16), default=None)}  # fmt: skip
    for lo, hi in M_BANDS:
        band = [p["bound"] for p in points if lo <= p["m"] <= hi]
        if band:
            out[f"M{lo}-{hi}_bound_geomean"] = _geomean(band)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(res["points"], key=lambda p: p["bytes"])
    bw = res["ceilings"]["bw_GBps"]
    mb = [p["bytes"] / 1e6 for p in pts]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.plot(mb, [p["bytes"] / bw / 1e3 for p in pts], "-", color="grey", label="bytes / copy bandwidth")
    ax.plot(mb, [p["read_us"] for p in pts], "o-", ms=3, label="best pure-read kernel (the practical floor)")
    ax.plot(mb, [p["cublas_us"] for p in pts], "s", ms=3, label="cuBLAS F.linear (each point)")
    ax.axhline(res["launch_us"], color="k", ls=":", lw=0.8, label=f"empty kernel {res['launch_us']:.1f} us")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes of the point (MB)")
    ax.set_ylabel("us per call (CUDA graph, L2 rotated)")
    s = res["summary"]
    ax.set_title(f"{res['gpu']}: upper bound on geomean vs cuBLAS {s['bound_geomean']:.3f}x "
                 f"(roofline alone {s['roofline_bound_geomean']:.3f}x)", fontsize=10)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    global REP_MS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--rep-ms", type=int, default=REP_MS)
    args = parser.parse_args()
    REP_MS = args.rep_ms
    res = run(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_bound.json").write_text(json.dumps(res, indent=1))
    plot(res, args.out / "gemm_bound.png")
    print(json.dumps({"launch_us": res["launch_us"], **res["summary"]}, indent=1))


if __name__ == "__main__":
    main()
