"""Where a step of the batch-1 decode kernel (ascend_kernels/decode_step_kernel.py) goes: a copy of the
kernel with %globaltimer stamps at every stage boundary, launched on the same buffers as the real one.

Per program, layer and stage (0 q/k/v, 1 attention + o, 2 MLP, 3 lm_head) the copy stamps
    0 the stage begins (after the previous stage's counter release)   1 attention done (stage 1)
    2 the grid wait is over                                           3 the input is staged
    4 the stage's chunks are done (the MLP: after its atomics)        5 the MLP's chunks, before the atomics
and the report takes medians over the programs of the middle layers (4..11). The copy is made by text
edits at fixed anchors of the kernel's source; a changed anchor fails loudly (tests/kernels/
test_decode_step.py compiles the copy for sm_90 on the CPU). It first ran on a GPU in session 15 (H200, 64
programs; benchmarks/RESULTS.md); the session-14 numbers there came from its one-off predecessor.

    python -m benchmarks.decode_step_timeline [--quick] [--tiles]     (sm_90; about a minute)
"""
from __future__ import annotations

import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import card_name, cli

STAMP_HELPERS = '''

@gluon.jit
def _now():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [gl.program_id(0)], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _stamp(ts_ptr, NL1: gl.constexpr, layer, s: gl.constexpr, f: gl.constexpr):
    gl.store(ts_ptr + ((gl.program_id(0) * NL1 + layer) * 4 + s) * 8 + f, _now())
'''
# (anchor, replacement): each anchor must occur exactly once, but those marked with a count
EDITS = [
    ("LOG2E = 1.4426950408889634\n", "LOG2E = 1.4426950408889634\n" + STAMP_HELPERS),
    ("best_val_ptr, best_idx_ptr, eps", "best_val_ptr, best_idx_ptr, ts_ptr, eps", 4),  # 2 signatures, 2 calls
    ("    best_val_ptr, best_idx_ptr,  # [G] fp32 / int32 per-program best logit (PICK)\n",
     "    best_val_ptr, best_idx_ptr,  # [G] fp32 / int32 per-program best logit (PICK)\n    ts_ptr,\n"),
    ("def _stage_start(layer, s: gl.constexpr, ci,", "def _stage_start(ts_ptr, NL1: gl.constexpr, layer, s: gl.constexpr, ci,"),
    ("    if s == 1:  # attention between", "    _stamp(ts_ptr, NL1, layer, s, 0)\n    if s == 1:  # attention between"),
    ("    if ci > 0:\n        wait_stage(cnt_ptr, ci - 1, G)\n",
     ("    _stamp(ts_ptr, NL1, layer, s, 1)\n    if ci > 0:\n        wait_stage(cnt_ptr, ci - 1, G)\n"
      "    _stamp(ts_ptr, NL1, layer, s, 2)\n")),
    ("        _stage_norm(xs, h_ptr, nw, eps, H, NB)\n    _barrier()\n",
     "        _stage_norm(xs, h_ptr, nw, eps, H, NB)\n    _barrier()\n    _stamp(ts_ptr, NL1, layer, s, 3)\n"),
    ("_stage_start(layer, ", "_stage_start(ts_ptr, NL + 1, layer, ", 3),
    ("_stage_start(NL, ", "_stage_start(ts_ptr, NL + 1, NL, "),
    ("        signal_stage(cnt_ptr, 4 * layer)\n", "        _stamp(ts_ptr, NL + 1, layer, 0, 4)\n        signal_stage(cnt_ptr, 4 * layer)\n"),
    ("        signal_stage(cnt_ptr, 4 * layer + 2)\n",
     "        _stamp(ts_ptr, NL + 1, layer, 1, 4)\n        signal_stage(cnt_ptr, 4 * layer + 2)\n"),
    ("        _mlp_flush(dacc, h_ptr, BOX, NB, XB)\n",
     ("        _stamp(ts_ptr, NL + 1, layer, 2, 5)\n        _mlp_flush(dacc, h_ptr, BOX, NB, XB)\n"
      "        _stamp(ts_ptr, NL + 1, layer, 2, 4)\n")),
    ("    top = gl.max(best_v, axis=0)\n", "    _stamp(ts_ptr, NL + 1, NL, 3, 4)\n    top = gl.max(best_v, axis=0)\n"),
]
# --tiles: stamps after single tiles (q/k/v: fields 5, 6, 7 after tiles 0, 3, 4; o: 6, 7 after tiles 0, 1), which
# tell a chunk's compute from its wait (session 16, H100: ~0.45 us a chunk already in the ring)
_QKV_END, _O_END = ("            i += 1\n        _stamp(ts_ptr, NL + 1, layer, 0, 4)\n",
                    "            i += 1\n        _stamp(ts_ptr, NL + 1, layer, 1, 4)\n")
TILE_EDITS = [
    (_QKV_END, "".join(f"            if j == {j}:\n                _stamp(ts_ptr, NL + 1, layer, 0, {f})\n"
                       for j, f in ((0, 5), (3, 6), (4, 7))) + _QKV_END),
    (_O_END, "".join(f"            if j == {j}:\n                _stamp(ts_ptr, NL + 1, layer, 1, {f})\n"
                     for j, f in ((0, 6), (1, 7))) + _O_END),
]


def stamped_source(tiles: bool = False) -> str:
    """decode_step_kernel.py with the stamps, and with `tiles` the per-tile ones (raises if the kernel's source
    moved under an anchor)."""
    src = (Path(__file__).parents[1] / "ascend_kernels" / "decode_step_kernel.py").read_text()
    for edit in EDITS + (TILE_EDITS if tiles else []):
        anchor, new, count = edit if len(edit) == 3 else (*edit, 1)
        if src.count(anchor) != count:
            raise RuntimeError(f"decode_step_timeline: anchor found {src.count(anchor)} times, not {count}: {anchor!r}")
        src = src.replace(anchor, new)
    return src


def stamped_module(tiles: bool = False):
    """The stamped kernel as an importable module (Gluon reads a kernel's source from its file)."""
    path = Path(tempfile.mkdtemp(prefix="xyserve_timeline_")) / "decode_step_kernel_stamped.py"
    path.write_text(stamped_source(tiles))
    spec = importlib.util.spec_from_file_location("decode_step_kernel_stamped", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _segments(t: torch.Tensor, num_attention: int) -> dict:
    """Median us per segment over programs and layers 4..11 of stamps t [G, NL + 1, 4, 8] (us, NaN unset);
    the first num_attention programs run attention."""
    mid = t[:, 4:12]

    def med(x):
        return round(x.nanmedian().item(), 2)

    out = {
        "q/k/v: wait for the previous MLP": med(mid[:, :, 0, 2] - mid[:, :, 0, 1]),
        "q/k/v: norm staged": med(mid[:, :, 0, 3] - mid[:, :, 0, 2]),
        "q/k/v: chunks": med(mid[:, :, 0, 4] - mid[:, :, 0, 3]),
        "q/k/v end -> attention begins (counter release)": med(mid[:, :, 1, 0] - mid[:, :, 0, 4]),
        "attention, its wait for q/k/v included": med(mid[:num_attention, :, 1, 1] - mid[:num_attention, :, 1, 0]),
        "o: wait for every split": med(mid[:, :, 1, 2] - mid[:, :, 1, 1]),
        "o: merge staged": med(mid[:, :, 1, 3] - mid[:, :, 1, 2]),
        "o: chunks": med(mid[:, :, 1, 4] - mid[:, :, 1, 3]),
        "o end -> MLP begins (counter release)": med(mid[:, :, 2, 0] - mid[:, :, 1, 4]),
        "MLP: wait": med(mid[:, :, 2, 2] - mid[:, :, 2, 1]),
        "MLP: norm staged": med(mid[:, :, 2, 3] - mid[:, :, 2, 2]),
        "MLP: chunks": med(mid[:, :, 2, 5] - mid[:, :, 2, 3]),
        "MLP: atomics": med(mid[:, :, 2, 4] - mid[:, :, 2, 5]),
        "MLP end -> next q/k/v begins (counter release)": med(t[:, 5:13, 0, 0] - mid[:, :, 2, 4]),
    }
    out["layer"] = med((t[:, 12, 0, 0] - t[:, 4, 0, 0]) / 8)
    out["MLP end skew (slowest - median program)"] = round(
        (mid[:, :, 2, 4].amax(0) - mid[:, :, 2, 4].median(0).values).mean().item(), 2)
    out["lm_head"] = med(t[:, -1, 3, 4] - t[:, -1, 3, 3])
    out["step"] = round(t[:, -1, 3, 4].max().item() - t[:, 0, 0, 0].min().item(), 2)
    if not mid[:, :, 0, 5].isnan().all():  # --tiles: means (the timer ticks in 0.256 us; a mean resolves below)
        for name, (s0, f0), (s1, f1) in _TILE_SEGMENTS:
            out[name] = round((mid[:, :, s1, f1] - mid[:, :, s0, f0]).nanmean().item(), 3)
    return out


_TILE_SEGMENTS = [  # (name, (stage, field) from, to)
    ("q/k/v tile 0, x staged included (mean)", (0, 3), (0, 5)), ("q/k/v tiles 1-3 (mean)", (0, 5), (0, 6)),
    ("q/k/v tile 4 (mean)", (0, 6), (0, 7)), ("q/k/v tiles 5- (mean)", (0, 7), (0, 4)),
    ("o tile 0, x staged included (mean)", (1, 3), (1, 6)), ("o tile 1 (mean)", (1, 6), (1, 7)),
    ("o tiles 2- (mean)", (1, 7), (1, 4))]


def run(quick: bool = False, tiles: bool = False) -> dict:
    from ascend_kernels import decode_step as ds
    from ascend_kernels.decode_step_kernel import LOG2E
    from benchmarks.ab_decode_step import step_inputs
    from benchmarks.bench_megakernel import _graph_us

    bs = 16
    w, k, v, bt = step_inputs(block_size=bs)
    d = w.dims
    kern = ds.DecodeStepKernel(w, k, v, bs)
    mod = stamped_module(tiles)
    token = torch.tensor([17], device="cuda", dtype=torch.int64)
    ts = torch.zeros(kern.num_sms * (d["NL"] + 1) * 32, device="cuda", dtype=torch.int64)

    def stamped(grid, pos):
        mod.decode_step_kernel[(grid,)](
            *kern.descs, kern.hidden, kern.hidden_attn, kern.qkv, kern.part, kern.logits, w.n1, w.n2, w.nf, k, v,
            bt, pos, w.inv_freq, kern.counters, token, token, w.embed, kern.best_val, kern.best_idx, ts,
            w.eps, w.rope_scale, LOG2E / math.sqrt(w.head_dim), k[0].numel(), grid, **d, BS=bs, NSPLIT=ds.NSPLIT,
            T=ds.TILE, BN=ds.BN, BOX=ds.BOX, NB=ds.NB, NBUF=ds.NBUF, PICK=0, num_warps=ds.NB)

    res = {"card": card_name(), "grid": kern.grid, "grid_us": kern.grid_us, "positions": {}}
    for p in (192,) if quick else (192, 900):
        pos = torch.tensor([p], device="cuda", dtype=torch.int32)
        row = {"us_plain": _graph_us(lambda pos=pos: kern._run(token, pos, bt, k, v, token, 0, kern.grid)),
               "us_stamped": _graph_us(lambda pos=pos: stamped(kern.grid, pos))}
        ts.fill_(-(1 << 62))
        stamped(kern.grid, pos)
        torch.cuda.synchronize()
        t = ts[: kern.grid * (d["NL"] + 1) * 32].view(kern.grid, d["NL"] + 1, 4, 8).double()
        t = torch.where(t < 0, float("nan"), t - t[:, 0, 0, 0].min()) / 1e3
        row["segments_us"] = _segments(t.cpu(), d["NQH"] * ds.NSPLIT)
        res["positions"][p] = row
    return res


def table(res: dict) -> str:
    lines = [f"{res['card']}: decode step kernel timeline, {res['grid']} programs (median us per layer segment)"]
    for p, row in res["positions"].items():
        lines += [f"position {p}: {row['us_plain']:.1f} us a step ({row['us_stamped']:.1f} stamped)",
                  "| segment | us |", "| --- | --- |"]
        lines += [f"| {name} | {us} |" for name, us in row["segments_us"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table, {"tiles": "also stamp single q/k/v and o tiles"})
