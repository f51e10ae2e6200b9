"""The decode megakernel probe (benchmarks/decode_megakernel.py) against the engine's per-kernel path.

Workload: 16 Llama-3.2-1B layers without attention at M = 1, 2 and 16 rows, bf16 weights (1.95 GB,
16 distinct weight sets), random weights. Per replay of a CUDA graph, in one process on one card:
- `inductor_cublas`: torch.compile of the eager layers (Inductor norms and SiLU, cuBLAS GEMVs,
  bf16 activations): the engine's path;
- `megakernel`: one persistent launch (fp32 activations), plus the two small kernels that reset
  its counters and load the input rows;
- `megakernel_mma_grid<G>` (M = 16): the tensor-core probe (decode_megakernel_mma.py) on G programs;
- `megakernel_no_sync` (diagnostic, wrong results): the grid waits removed, i.e. what streaming
  the weights with the same compute costs;
- the floor: weight bytes / measured copy bandwidth.
Errors are relative to a float32 reference of the same layers (max |err| / max |ref|).

    python -m benchmarks.bench_megakernel        (sm_90 only; ~1 minute)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from benchmarks.common import card_name, card_rates, cli, is_sm90, rel_err
from benchmarks.megakernel_wgmma_runs import _megakernel_wgmma, _megakernel_wgmma_tma  # noqa: F401 (tests)

H, I, NQ, L, EPS = 2048, 8192, 3072, 16, 1e-5
SMEM_BYTES = 227 * 1024


@dataclasses.dataclass(slots=True)
class MegakernelConfig:
    m: int = 1  # batch rows
    bn: int = 8  # output rows per tile
    box: int = 256  # columns per TMA box
    num_boxes: int = 8  # boxes per chunk = compute warps
    num_buf: int = 4  # ring slots of one chunk each

    def __post_init__(self):
        if self.m not in (1, 2):
            raise ValueError(f"m must be 1 or 2, got {self.m}")
        if H % (self.box * self.num_boxes) or I % (self.box * self.num_boxes):
            raise ValueError("a chunk (box * num_boxes columns) must divide the hidden and MLP sizes")
        smem = self.num_buf * self.num_boxes * self.bn * self.box * 2 + self.m * I * 4
        if smem > SMEM_BYTES:
            raise ValueError(f"ring + activations need {smem} bytes of shared memory (> {SMEM_BYTES})")


def _weights(dev: str) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(torch.bfloat16)

    return {"wq": rnd(L * NQ, H, scale=H**-0.5), "wo": rnd(L * H, H, scale=H**-0.5),
            "wg": rnd(L * 2 * I, H, scale=H**-0.5), "wd": rnd(L * H, I, scale=I**-0.5),
            "n1": (torch.rand(L, H, device=dev, generator=g) + 0.5).to(torch.bfloat16),
            "n2": (torch.rand(L, H, device=dev, generator=g) + 0.5).to(torch.bfloat16)}


def _layers(w: dict, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference layers; dtype=bfloat16 rounds activations like the model, float32 does not."""
    def norm(x, g):
        xf = x.float()
        return g.to(dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)

    h = h.to(dtype)
    for i in range(L):
        q = F.linear(norm(h, w["n1"][i]), w["wq"][i * NQ:(i + 1) * NQ].to(dtype))
        h = h + F.linear(q[:, :H], w["wo"][i * H:(i + 1) * H].to(dtype))
        gu = F.linear(norm(h, w["n2"][i]), w["wg"][i * 2 * I:(i + 1) * 2 * I].to(dtype))
        h = h + F.linear(F.silu(gu[:, :I]) * gu[:, I:], w["wd"][i * H:(i + 1) * H].to(dtype))
    return h


def _lm_weights(dev: str, vocab: int = 128256) -> dict:
    """Llama-3's lm_head [V, H] and final norm weights (random), for the probes that end in greedy tokens."""
    g = torch.Generator(device=dev).manual_seed(3)
    return {"wl": (torch.randn(vocab, H, device=dev, generator=g) * H**-0.5).to(torch.bfloat16),
            "nf": (torch.rand(H, device=dev, generator=g) + 0.5).to(torch.bfloat16)}


def _logits(lm: dict, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The final norm and lm_head of the reference, in dtype (float32 logits)."""
    hf = h.float()
    x = lm["nf"].to(dtype) * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
    return F.linear(x, lm["wl"].to(dtype)).float()


def _graph_us(fn, reps: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def _megakernel(w: dict, x: torch.Tensor, cfg: MegakernelConfig, sync: bool):
    """A callable that runs the probe on rows x (fp32 result in its `h`)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from benchmarks.decode_megakernel import decode_megakernel_kernel

    layout = gl.NVMMASharedLayout(0, 16, rank=2)
    descs = [TensorDescriptor.from_tensor(w[k], [cfg.bn, cfg.box], layout) for k in ("wq", "wo", "wg", "wd")]
    grid = torch.cuda.get_device_properties(0).multi_processor_count
    if H // cfg.bn < grid:
        raise ValueError("every program needs a row tile in every stage")
    h = torch.empty(cfg.m, H, device="cuda")
    scratch_q, scratch_g = torch.empty(cfg.m, NQ, device="cuda"), torch.empty(cfg.m, I, device="cuda")
    counters = torch.zeros(L * 4, device="cuda", dtype=torch.int32)

    def run():
        h.copy_(x)
        counters.zero_()
        decode_megakernel_kernel[(grid,)](*descs, h, scratch_q, scratch_g, w["n1"], w["n2"], counters, EPS, grid,
                                          M=cfg.m, NL=L, H=H, I=I, NQ=NQ, BN=cfg.bn, BOX=cfg.box,
                                          NB=cfg.num_boxes, NBUF=cfg.num_buf, SYNC=int(sync),
                                          num_warps=cfg.num_boxes)
    run.h = h
    return run


def _megakernel_mma(w: dict, x: torch.Tensor, grid: int | None = None):
    """A callable that runs the batch-16 tensor-core probe (decode_megakernel_mma.py) on rows x (at most
    16; fp32 result in its `h`, rows past x's zero)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from benchmarks.decode_megakernel_mma import decode_megakernel_mma_kernel

    mb, max_tiles, m = 16, 4, x.shape[0]
    if not 1 <= m <= mb:
        raise ValueError(f"the probe takes 1 to {mb} rows, got {m}")
    layout = gl.NVMMASharedLayout(128, 16, rank=2)
    descs = [TensorDescriptor.from_tensor(w[k], [8, 64], layout) for k in ("wq", "wo", "wg", "wd")]
    grid = grid or torch.cuda.get_device_properties(0).multi_processor_count
    if -(-H // 8 // grid) > max_tiles or H // 8 < grid:
        raise ValueError(f"grid {grid}: every program needs 1 to {max_tiles} row tiles of the hidden size")
    h = torch.zeros(mb, H, device="cuda")
    scratch_q, scratch_g = torch.zeros(mb, NQ, device="cuda"), torch.zeros(mb, I, device="cuda")
    counters = torch.zeros(L * 4, device="cuda", dtype=torch.int32)

    def run():
        h[:m].copy_(x)
        counters.zero_()
        decode_megakernel_mma_kernel[(grid,)](*descs, h, scratch_q, scratch_g, w["n1"], w["n2"], counters, EPS, grid,
                                              m, NL=L, H=H, I=I, NQ=NQ, MB=mb, BN=8, NB=8, NBUF=4, MAXT=max_tiles,
                                              num_warps=8)
    run.h = h[:m]
    return run


def run(quick: bool = False) -> dict:
    if not is_sm90():
        return {"skipped": "needs an sm_90 GPU"}
    w = _weights("cuda")
    wbytes = sum(t.numel() * t.element_size() for t in w.values())
    rates = card_rates()
    res = {"card": card_name(), "weight_bytes": wbytes, "copy_bytes_per_s": rates["copy_bytes_per_s"],
           "floor_us": wbytes / rates["copy_bytes_per_s"] * 1e6, "rows": {}}
    x0 = torch.randn(2, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    compiled = torch.compile(lambda h: _layers(w, h, torch.bfloat16))
    for m in (1, 2):
        x = x0[:m].contiguous()
        ref = _layers(w, x, torch.float32)
        row = {}
        with torch.no_grad():
            row["inductor_cublas"] = {"us": _graph_us(lambda x=x: compiled(x)), "err": rel_err(compiled(x), ref)}
        for name, sync in (("megakernel", True), ("megakernel_no_sync", False)):
            fn = _megakernel(w, x, MegakernelConfig(m=m), sync)
            us = _graph_us(fn)
            errs = []
            for _ in range(3):  # replays must agree with the reference every time (counters reset)
                fn()
                torch.cuda.synchronize()
                errs.append(rel_err(fn.h, ref))
            row[name] = {"us": us, "err": max(errs)}
        for v in row.values():
            v["floor_pct"] = 100 * res["floor_us"] / v["us"]
        res["rows"][f"M={m}"] = row
        print(m, row, flush=True)
    # batch 16 on tensor cores (the probe stages activations in bf16, as the model's linears take them)
    x = torch.randn(16, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    ref, row = _layers(w, x, torch.float32), {}
    with torch.no_grad():
        row["inductor_cublas"] = {"us": _graph_us(lambda: compiled(x)), "err": rel_err(compiled(x), ref)}
    for kind, make in (("mma", _megakernel_mma), ("wgmma", _megakernel_wgmma)):
        for grid in (64, 128, torch.cuda.get_device_properties(0).multi_processor_count):
            row[f"megakernel_{kind}_grid{grid}"] = _probe_row(make(w, x, grid), ref)
    for name, kw in (("megakernel_wgmma_grid128_balanced", {"balance": True}),
                     ("megakernel_wgmma_grid128_balanced_bf16", {"balance": True, "scratch": torch.bfloat16}),
                     ("megakernel_wgmma_grid132_balanced_bf16", {"balance": True, "scratch": torch.bfloat16,
                                                                 "grid": 132}),
                     ("megakernel_wgmma_tma_grid128", {"tma": True}),
                     ("megakernel_wgmma_tma_grid132", {"tma": True, "grid": 132}),
                     ("megakernel_wgmma_grid128_ring5", {"num_buf": 5}),
                     ("megakernel_wgmma_grid128_no_sync", {"sync": False}),  # wrong results (diagnostic)
                     ("megakernel_wgmma_grid128_balanced_no_sync", {"sync": False, "balance": True})):
        kw = {"grid": 128, **kw}
        fn = _megakernel_wgmma_tma(w, x, kw["grid"]) if kw.pop("tma", False) else _megakernel_wgmma(w, x, **kw)
        row[name] = _probe_row(fn, ref)
    for v in row.values():
        v["floor_pct"] = 100 * res["floor_us"] / v["us"]
    res["rows"]["M=16"] = row
    print(16, row, flush=True)
    return res


def _probe_row(fn, ref: torch.Tensor) -> dict:
    """A probe's graph-replay time and, after one more run, its residual stream's error against `ref`."""
    us = _graph_us(fn)
    fn()
    torch.cuda.synchronize()
    return {"us": us, "err": rel_err(fn.h, ref)}


def table(res: dict) -> str:
    if "rows" not in res:
        return str(res)
    lines = [f"{res['card']}: 16 Llama-3.2-1B layers without attention, floor {res['floor_us']:.0f} us",
             "| rows | Inductor + cuBLAS | megakernel | speedup | no grid sync (diagnostic) |",
             "| --- | --- | --- | --- | --- |"]
    for m, r in res["rows"].items():
        base = r["inductor_cublas"]
        for name, mk in r.items():
            if name.startswith("megakernel") and name != "megakernel_no_sync":
                ns = r.get("megakernel_no_sync")
                diag = f"{ns['us']:.0f} us ({ns['floor_pct']:.0f}%)" if ns and name == "megakernel" else ""
                lines.append(f"| {m} {name} | {base['us']:.0f} us ({base['floor_pct']:.0f}%, err {base['err']:.1e}) | "
                             f"{mk['us']:.0f} us ({mk['floor_pct']:.0f}%, err {mk['err']:.1e}) | "
                             f"{base['us'] / mk['us']:.2f}x | {diag} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
