"""What does one grid-wide stage boundary of the persistent decode kernel cost with no work around it?

The batch-1 decode kernel (ascend_kernels/decode_step_kernel.py) ends each of its 4 stages a layer with a
grid counter: every program signals once (`signal_stage`: a CTA barrier, then thread 0's `red.release`)
and a program that needs the stage's outputs polls the counter (`wait_stage`: acquire atomics) until all G
programs have arrived. In the kernel a boundary costs about 1 us at 64 programs and 2-2.5 us at 128
(benchmarks/RESULTS.md, sessions 14-16), but there it also absorbs the programs' skew and their stores.
This probe times boundaries back to back with nothing else, one CTA an SM (a large shared allocation
keeps a second CTA off), so the cost of the arrivals themselves shows:

    program p:  t0 | signal(c0) wait(c0 == G) | signal(c1) wait(c1 == G) | ... R rounds ... | t1

SPLIT > 1 spreads each round's counter over SPLIT words 128 bytes apart (program p bumps word p % SPLIT;
the pollers read all SPLIT words and sum them): if same-address reductions queue at L2, this is cheaper.

    python -m benchmarks.boundary_probe      (sm_90; seconds)
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.grid_sync import signal_stage, wait_stage
from benchmarks.common import card_name, cli, is_sm90

LINE = 32  # int32 words in a 128-byte line
SHARED_BYTES = 128 * 1024  # more than half an SM's shared memory: one CTA an SM, as in the decode kernel


@gluon.jit
def _now(x):
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _wait_split(cnt_ptr, base, G, SPLIT: gl.constexpr):
    """Poll SPLIT counters (a word each, a line apart) until their sum reaches G."""
    seen = 0
    while seen < G:
        seen = 0
        for s in gl.static_range(SPLIT):  # independent loads: their round trips overlap
            seen += gl.atomic_add(cnt_ptr + base + s * 32, 0, sem="acquire")


@gluon.jit
def boundary_probe_kernel(
    cnt_ptr,  # [R * SPLIT * LINE] int32 counters, zero at launch
    out_ptr,  # [G] int64 ns per boundary, per program
    G, R,
    SPLIT: gl.constexpr, SHARED: gl.constexpr,
):
    hold = gl.allocate_shared_memory(gl.int8, [SHARED], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    hold.slice(0, 1024).store(gl.zeros([1024], gl.int8, gl.BlockedLayout([4], [32], [gl.num_warps()], [0])))
    pid = gl.program_id(0)
    t0 = _now(pid)
    for r in range(R):
        if SPLIT == 1:
            signal_stage(cnt_ptr, r * 32)
            wait_stage(cnt_ptr, r * 32, G)
        else:
            signal_stage(cnt_ptr, (r * SPLIT + pid % SPLIT) * 32)
            _wait_split(cnt_ptr, r * SPLIT * 32, G, SPLIT)
    t1 = _now(pid)
    gl.store(out_ptr + pid, (t1 - t0) // R)


def probe(grid: int, split: int, rounds: int = 2000, repeats: int = 5) -> dict:
    """Median over programs and launches of the ns one boundary takes."""
    per_launch = []
    for _ in range(repeats + 1):  # the first launch compiles
        cnt = torch.zeros(rounds * split * LINE, dtype=torch.int32, device="cuda")
        out = torch.zeros(grid, dtype=torch.int64, device="cuda")
        boundary_probe_kernel[(grid,)](cnt, out, grid, rounds, SPLIT=split, SHARED=SHARED_BYTES, num_warps=8)
        torch.cuda.synchronize()
        per_launch.append(float(out.float().median()))
    times = sorted(per_launch[1:])
    return {"grid": grid, "split": split, "ns_median": times[len(times) // 2], "ns_min": times[0], "ns_max": times[-1]}


def run(quick: bool = False) -> dict:
    if not is_sm90():
        return {"skipped": "needs an sm_90 GPU"}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grids = sorted({32, 64, 96, 128, sms})
    return {"card": card_name(), "probes": [probe(g, s) for s in (1, 8) for g in grids]}


def table(res: dict) -> str:
    if "probes" not in res:
        return str(res)
    lines = [f"{res['card']}: one grid boundary (signal, then wait for every program), idle card, ns",
             "| programs | one counter | counter split over 8 lines |", "| --- | --- | --- |"]
    by = {(p["grid"], p["split"]): p["ns_median"] for p in res["probes"]}
    for g in sorted({p["grid"] for p in res["probes"]}):
        lines.append(f"| {g} | {by.get((g, 1), float('nan')):.0f} | {by.get((g, 8), float('nan')):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
