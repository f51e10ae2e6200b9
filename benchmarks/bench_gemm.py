"""SmoothGEMM vs cuBLAS (F.linear), bf16, Llama-3-8B and Llama-3.2-1B linears over M.

    python benchmarks/bench_gemm.py [--quick] [--out DIR]

Every point, both implementations timed two ways on random data with the weights rotated over
enough copies to exceed L2: "graph" = triton.testing.do_bench_cudagraph median (many calls in one
CUDA graph, as the engine runs them) and "eager" = triton.testing.do_bench median (one launch at a
time, L2 flushed before each). A correctness check against a float64 product, and the roofline floor
max(bytes / measured copy bandwidth, flops / measured cuBLAS 8192^3 rate) from this same run.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ascend_kernels.gemm import smooth_gemm  # noqa: E402
from ascend_kernels.gemm_table import device_key, load_table, lookup  # noqa: E402
from ascend_kernels.tune_gemm import _rotation, bench_us, model_shapes  # noqa: E402

M_POINTS = (1, 3, 8, 17, 37, 64, 100, 129, 256, 333, 512, 1000, 2048, 4096)
QUICK_M = (1, 8, 37, 129, 512, 2048)
MODELS = ("llama-3-8b", "llama-3.2-1b")


def ceilings() -> dict:
    """Measured copy bandwidth (read + write bytes) and cuBLAS bf16 matmul rate on this card."""
    src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    t_copy = bench_us(lambda: dst.copy_(src), graph=False)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = bench_us(lambda: torch.mm(a, b), graph=False)
    return {"bw_GBps": 2 * src.numel() * 2 / t_copy / 1e3, "mm_TFLOPs": 2 * 8192**3 / t_mm / 1e6}


def point(n: int, k: int, m: int, ws: list, ceil: dict) -> dict:
    xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in ws]
    ref = F.linear(xs[0].double(), ws[0].double())
    err = ((smooth_gemm(xs[0], ws[0], None, False).double() - ref).norm() / ref.norm()).item()
    state = {"i": 0}

    def rotating(fn):
        def call():
            i = state["i"] = (state["i"] + 1) % len(ws)
            fn(xs[i], ws[i])

        return call

    nbytes = 2 * (m * k + n * k + m * n)
    flops = 2 * m * n * k
    floor = max(nbytes / ceil["bw_GBps"] / 1e3, flops / ceil["mm_TFLOPs"] / 1e6)  # us
    res = {"n": n, "k": k, "m": m, "rel_err": err, "floor_us": floor}
    for mode in ("graph", "eager"):
        t_cublas = bench_us(rotating(lambda x, w: F.linear(x, w)), graph=mode == "graph")
        t_smooth = bench_us(rotating(lambda x, w: smooth_gemm(x, w, None, False)), graph=mode == "graph")
        res.update({f"{mode}_cublas_us": t_cublas, f"{mode}_smooth_us": t_smooth,
                    f"{mode}_speedup": t_cublas / t_smooth})  # fmt: skip
    t = res["graph_smooth_us"]
    res.update({"smooth_of_floor": floor / t, "cublas_of_floor": floor / res["graph_cublas_us"],
                "smooth_GBps": nbytes / t / 1e3, "smooth_TFLOPs": flops / t / 1e6})  # fmt: skip
    res["config"] = lookup(n, k, m, device_key()).to_dict()
    return res


def plot(points: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(p["model"], p["layer"]) for p in points})
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), sharey=True)
    for ax, (model, layer) in zip(axes.flat, shapes):
        pts = [p for p in points if (p["model"], p["layer"]) == (model, layer)]
        ms = [p["m"] for p in pts]
        ax.plot(ms, [p["smooth_of_floor"] for p in pts], "o-", label="SmoothGEMM")
        ax.plot(ms, [p["cublas_of_floor"] for p in pts], "s--", label="cuBLAS F.linear")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {layer} N={pts[0]['n']} K={pts[0]['k']}", fontsize=9)
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("roofline floor / time")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(quick: bool = False, out_dir: Path | None = None) -> dict:
    """Benchmark every shape; returns {'gpu', 'ceilings', 'points', 'summary'}."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    ceil = ceilings()
    points = []
    for model in MODELS[:1] if quick else MODELS:
        for layer, (n, k) in model_shapes(model).items():
            copies = _rotation(n, k, torch.bfloat16)
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(copies)]
            for m in QUICK_M if quick else M_POINTS:
                points.append({"model": model, "layer": layer, **point(n, k, m, ws, ceil)})
            del ws
    summary = {"max_rel_err": max(p["rel_err"] for p in points), "table_shapes": len(load_table(device_key()))}
    for mode in ("graph", "eager"):
        speedups = [p[f"{mode}_speedup"] for p in points]
        summary[mode] = {
            "geomean_speedup": math.exp(sum(map(math.log, speedups)) / len(speedups)),
            "min_speedup": min(speedups),
            "points_below_0.9": sum(s < 0.9 for s in speedups),
        }
    small = [p for p in points if p["m"] <= 16]
    summary["small_m_bw_frac_min"] = min(p["smooth_GBps"] / ceil["bw_GBps"] for p in small) if small else None
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceil,
              "points": points, "summary": summary}  # fmt: skip
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_gemm.json").write_text(json.dumps(result, indent=1))
        plot(points, out_dir / "bench_gemm.png")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = parser.parse_args()
    res = run(args.quick, args.out)
    c = res["ceilings"]
    print(f"{res['gpu']}: copy {c['bw_GBps']:.0f} GB/s, cuBLAS 8192^3 {c['mm_TFLOPs']:.0f} TFLOP/s")
    print("graph = CUDA-graph replay (engine-like); eager = one launch at a time, L2 flushed")
    print(f"{'model':13s} {'layer':8s} {'M':>5s} {'cuBLAS':>7s} {'smooth':>7s} {'x':>5s} {'floor%':>6s} "
          f"{'eagerx':>6s} cfg (graph us)")  # fmt: skip
    for p in res["points"]:
        cfg = p["config"]
        tag = f"{cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']}/s{cfg['split_k']}{'/tma' if cfg['tma'] else ''}"
        print(f"{p['model']:13s} {p['layer']:8s} {p['m']:5d} {p['graph_cublas_us']:7.1f} {p['graph_smooth_us']:7.1f} "
              f"{p['graph_speedup']:5.2f} {100 * p['smooth_of_floor']:5.0f}% "
              f"{p['eager_speedup']:6.2f} {tag}")  # fmt: skip
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
