"""Runners of the swap-AB wgmma probes (decode_megakernel_wgmma*.py) for bench_megakernel: each builds its
descriptors and buffers once and returns a callable that launches the probe on rows x (at most 16)."""
from __future__ import annotations

import torch


def _megakernel_wgmma(w: dict, x: torch.Tensor, grid: int | None = None, sync: bool = True, num_buf: int = 4,
                      defer: bool = False, balance: bool = False, scratch=torch.float32):
    """A callable that runs the batch-16 swap-AB wgmma probe (decode_megakernel_wgmma.py) on rows x (at
    most 16; fp32 result in its `h`)."""
    from benchmarks.bench_megakernel import EPS, H, I, L, NQ  # at call time (that module imports this one)
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from benchmarks.decode_megakernel_wgmma import decode_megakernel_wgmma_kernel

    mb, m = 16, x.shape[0]
    if not 1 <= m <= mb:
        raise ValueError(f"the probe takes 1 to {mb} rows, got {m}")
    layout = gl.NVMMASharedLayout(128, 16, rank=2)
    descs = [TensorDescriptor.from_tensor(w[k], [64, 64], layout) for k in ("wq", "wo", "wg", "wd")]
    grid = grid or torch.cuda.get_device_properties(0).multi_processor_count
    h = torch.zeros(mb, H, device="cuda")
    scratch_q = torch.zeros(mb, NQ, device="cuda", dtype=scratch)
    scratch_g = torch.zeros(mb, I, device="cuda", dtype=scratch)
    counters = torch.zeros(L * 4, device="cuda", dtype=torch.int32)

    def run():
        h[:m].copy_(x)
        counters.zero_()
        decode_megakernel_wgmma_kernel[(grid,)](*descs, h, scratch_q, scratch_g, w["n1"], w["n2"], counters, EPS,
                                                grid, m, NL=L, H=H, I=I, NQ=NQ, MB=mb, NBUF=num_buf, SYNC=int(sync),
                                                DEFER=int(defer), BALANCE=int(balance), num_warps=4)
    run.h = h[:m]
    return run


def _megakernel_wgmma_tma(w: dict, x: torch.Tensor, grid: int | None = None, lm: dict | None = None):
    """A callable that runs the TMA-staged swap-AB probe (decode_megakernel_wgmma_tma.py) on rows x (at
    most 16; fp32 result in its `h`). Its q/k/v and gate/up weights carry the norm weights. With `lm`
    ({"wl": [V, H], "nf": [H]}) it also runs the lm_head: `logits` [m, V] and greedy `tokens` [m]."""
    from benchmarks.bench_megakernel import EPS, H, I, L, NQ  # at call time (that module imports this one)
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from benchmarks.decode_megakernel_wgmma_tma import decode_megakernel_wgmma_tma_kernel

    mb, m = 16, x.shape[0]
    if not 1 <= m <= mb:
        raise ValueError(f"the probe takes 1 to {mb} rows, got {m}")
    folded = {"wq": (w["wq"].view(L, NQ, H).float() * w["n1"].view(L, 1, H).float()).to(torch.bfloat16).view(-1, H),
              "wg": (w["wg"].view(L, 2 * I, H).float() * w["n2"].view(L, 1, H).float()).to(torch.bfloat16).view(-1, H)}
    layout = gl.NVMMASharedLayout(128, 16, rank=2)
    descs = [TensorDescriptor.from_tensor(folded.get(k, w[k]), [64, 64], layout) for k in ("wq", "wo", "wg", "wd")]
    grid = grid or torch.cuda.get_device_properties(0).multi_processor_count
    h = torch.zeros(mb, H, device="cuda")
    hb = torch.zeros(mb, H, device="cuda", dtype=torch.bfloat16)
    scratch_q = torch.zeros(mb, NQ, device="cuda", dtype=torch.bfloat16)
    scratch_g = torch.zeros(mb, I, device="cuda", dtype=torch.bfloat16)
    acts = [TensorDescriptor.from_tensor(t, [mb, 64], layout) for t in (scratch_q, hb, scratch_g)]
    part = torch.empty(H // 64 * (I // 2048), 64, mb, device="cuda")
    counters = torch.zeros(L * 4 + H // 64 + 1, device="cuda", dtype=torch.int32)
    vocab = lm["wl"].shape[0] if lm else 0
    if lm:
        folded["wl"] = (lm["wl"].float() * lm["nf"].float()).to(torch.bfloat16)
    wl_desc = TensorDescriptor.from_tensor(folded["wl"], [64, 64], layout) if lm else descs[0]
    logits = torch.empty(mb, max(vocab, 1), device="cuda")
    best_v, best_i = torch.empty(grid, mb, device="cuda"), torch.empty(grid, mb, device="cuda", dtype=torch.int32)
    tokens = torch.zeros(mb, device="cuda", dtype=torch.int64)

    def run():
        h[:m].copy_(x)
        hb[:m].copy_(x)
        counters.zero_()
        decode_megakernel_wgmma_tma_kernel[(grid,)](*descs, wl_desc, *acts, h, hb, scratch_q, scratch_g, part, logits,
                                                    best_v, best_i, tokens, counters, EPS, grid, m, NL=L, H=H, I=I,
                                                    NQ=NQ, MB=mb, NBUF=4, V=vocab, num_warps=4)
    run.h, run.logits, run.tokens = h[:m], logits[:m], tokens[:m]
    run.keep = folded  # the descriptors point into these
    return run
