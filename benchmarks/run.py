"""One command for every benchmark suite on whatever card is present.

    python -m benchmarks.run --quick        # under 10 minutes on one GPU
    python -m benchmarks.run                # the full sweep
    python -m benchmarks.run --smoke        # CPU: tiny models, checks the harness end to end

Writes benchmarks/results/<card>.json (or --out DIR) with every suite's numbers, the baselines
measured in the same process, and PNG plots beside it. Suites that need a GPU are recorded as
skipped on the CPU; a suite that fails is recorded with its error and the others still run.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import card_name, card_slug

# (suite, module, needs a GPU), end-to-end first: the report is rewritten after every suite, so
# a run cut short keeps what it measured.
SUITES = [
    ("decode", "benchmarks.bench_decode", False),
    ("decode_step", "benchmarks.bench_decode_step", True),  # the whole-step kernel alone (sm_90; else it skips)
    ("engine", "benchmarks.bench_engine", False),
    ("attention", "benchmarks.bench_attention", True),
    ("gemm", "benchmarks.bench_gemm", True),
    ("serving", "benchmarks.bench_serving", False),
    # last: it resets Dynamo, so a suite after it would compile the engine's graph again
    ("compile", "benchmarks.bench_compile", False),
]


def run_suite(module_name: str, quick: bool, out_dir: Path) -> dict:
    module = importlib.import_module(module_name)
    params = inspect.signature(module.run).parameters
    kwargs = {"quick": quick}
    if "out_dir" in params:
        kwargs["out_dir"] = out_dir
    start = time.perf_counter()
    result = module.run(**kwargs)
    result["suite_seconds"] = time.perf_counter() - start
    if hasattr(module, "table"):
        try:
            result["table"] = module.table(result)
        except Exception as e:  # a table is a convenience; the numbers are already in the JSON
            result["table"] = f"(table failed: {type(e).__name__}: {e})"
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short sweep (under 10 minutes on one GPU)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized check of the harness (implies --quick)")
    p.add_argument("--only", nargs="*", help="suite names to run (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=None, help="start no suite after this many seconds")
    args = p.parse_args(argv)
    quick = args.quick or args.smoke
    out_dir = args.out or Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    report = {"card": card_name(), "torch": torch.__version__, "quick": quick, "started": time.time(), "suites": {}}
    path = out_dir / f"{card_slug()}.json"
    for name, module_name, needs_gpu in SUITES:
        if args.only and name not in args.only:
            continue
        if needs_gpu and not gpu:
            report["suites"][name] = {"skipped": "needs a GPU"}
            continue
        if args.budget_s is not None and time.time() - report["started"] > args.budget_s:
            report["suites"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        print(f"== {name}", flush=True)
        try:
            report["suites"][name] = run_suite(module_name, quick, out_dir)
        except Exception as e:
            import traceback

            traceback.print_exc()
            report["suites"][name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        print(report["suites"][name].get("table", ""), flush=True)
        path.write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = time.time() - report["started"]
    from benchmarks.plots import plot_all

    report["plots"] = [str(x) for x in plot_all(report, out_dir)]
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path} and {len(report['plots'])} plot(s)")
    return report


if __name__ == "__main__":
    main()
