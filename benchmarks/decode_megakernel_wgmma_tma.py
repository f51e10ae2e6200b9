"""The swap-AB wgmma probe (decode_megakernel_wgmma.py) with its activations staged by TMA: the
third batch-16 try for issue 6. That probe streams its weights at the floor when nothing else runs
(658 us for 656 on an H100), but staging the 16 activation rows costs ~21 us a layer: every program
reads them from L2 into registers (fp32 for the residual), applies the norm weights and stores bf16
into shared memory, box after box.

Here each stage's producer writes what the next stage reads in bf16, ready to be copied: q and
SiLU(gate) x up as before, and a bf16 shadow `hb` of the fp32 residual, written by the programs
that finish its rows. A stage's input is then 32 TMA boxes [16, 64] into xs behind one mbarrier;
RMSNorm's weights are folded into the q/k/v and gate/up weights on the host (W * w_norm, column
by column: RMSNorm(h) @ W^T = rs * (h @ (W * w_norm)^T)), and each row's 1 / rms is summed from
xs once the copy lands.

The down projection's K slices (4 per 64-row tile) no longer add into h with atomics: each slice
stores its partial and the tile's last slice to arrive sums the 4 in slice order, adds them to h
and writes h and hb (deterministic; a counter per tile, left zero).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import tma_load as _tma_load
from ascend_kernels.grid_sync import signal_stage, wait_stage
from benchmarks.decode_megakernel_wgmma import BN, BOXK, KS, issue_item, item_chunks, items, places, stream_weights


@gluon.jit
def _fence_proxy_global(ptr):
    """Order the generic-proxy stores this program has acquired (other programs' outputs) before the
    async-proxy (TMA) reads that follow."""
    gl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r,l", [ptr], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _stage(xs, xbar, nx, desc, col0, eps, cnt_ptr, NORM: gl.constexpr, MB: gl.constexpr, ROWS: gl.constexpr):
    """Columns col0 .. col0 + 2047 of desc's [MB, N] bf16 rows into xs (staging number nx); returns each
    row's 1 / rms over them (ones without NORM) in the accumulator's column layout, and nx + 1."""
    _barrier()  # every warp's wgmmas have read the last staged rows
    _fence_proxy_global(cnt_ptr)
    mbarrier.expect(xbar.index(0), MB * KS * 2)
    for b in gl.static_range(KS // BOXK):
        _tma_load(desc, [0, col0 + b * BOXK], xbar.index(0), xs.index(b))
    mbarrier.wait(xbar.index(0), nx & 1)
    XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    ss = gl.zeros([MB], gl.float32, gl.SliceLayout(1, XL))
    if NORM:
        for b in gl.static_range(KS // BOXK):
            x = xs.index(b).load(XL).to(gl.float32)
            ss += gl.sum(x * x, axis=1)
    rs = gl.rsqrt(ss / KS + eps) if NORM else ss + 1.0
    return gl.convert_layout(rs, ROWS), nx + 1


@gluon.jit
def _down_tile(acc, t, h_ptr, hb_ptr, part_ptr, cnt_ptr, r2, m2, ok, NL: gl.constexpr, H: gl.constexpr,
               NS: gl.constexpr, MB: gl.constexpr):
    """Slice t % NS of down tile t // NS: publish the partial; the tile's last slice to arrive adds all
    of them (in slice order) into h and writes h's bf16 shadow."""
    tile = t // NS
    offs = r2 * MB + m2  # [64, MB] within a partial
    gl.store(part_ptr + t * (BN * MB) + offs, acc)
    _barrier()  # every thread's partial precedes the release below
    if gl.atomic_add(cnt_ptr + 4 * NL + tile, 1, sem="acq_rel") == NS - 1:
        tot = gl.load(part_ptr + tile * NS * (BN * MB) + offs, cache_modifier=".cg")
        for s in gl.static_range(1, NS):
            tot += gl.load(part_ptr + (tile * NS + s) * (BN * MB) + offs, cache_modifier=".cg")
        dst = m2 * H + tile * BN + r2
        hn = gl.load(h_ptr + dst, mask=ok, other=0.0, cache_modifier=".cg") + tot
        gl.store(h_ptr + dst, hn, mask=ok)
        gl.store(hb_ptr + dst, hn.to(gl.bfloat16), mask=ok)
        gl.atomic_xchg(cnt_ptr + 4 * NL + tile, 0)  # zero for the next launch


@gluon.jit
def _lm_place(G, NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, BALANCE: gl.constexpr):
    """This program's place in the lm_head's deal (after the last layer's down items with BALANCE)."""
    off = (NQ // BN + H // BN + I // BN + (H // BN) * (I // KS)) % G if BALANCE else 0
    return (gl.program_id(0) - off + G) % G


@gluon.jit
def _lm_head(i, nx, pe, G, eps, xs, xbar, ring, ready, empty, xh_desc, logits_ptr, cnt_ptr, zero, r2, m2, ok,
             V: gl.constexpr, NBUF: gl.constexpr, MB: gl.constexpr, ROWS: gl.constexpr):
    """Logits of this program's lm_head tiles (final norm folded into the weights) and, per batch row, the
    best logit and its first index over them."""
    rs, nx = _stage(xs, xbar, nx, xh_desc, 0, eps, cnt_ptr, True, MB, ROWS)
    rs2 = gl.expand_dims(rs, 0)
    best_v = gl.full([MB], float("-inf"), gl.float32, ROWS)
    best_i = gl.zeros([MB], gl.int32, ROWS)
    for j in range(items(V // BN, G, pe)):
        row0 = (pe + j * G) * BN
        acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
        val = acc * rs2
        gl.store(logits_ptr + m2 * V + row0 + r2, val, mask=ok)
        top = gl.max(val, axis=0)
        first = gl.min(gl.where(val == gl.expand_dims(top, 0), r2 + row0, V), axis=0)
        best_i = gl.where(top > best_v, first, best_i)  # tiles come in row order: > keeps the first maximum
        best_v = gl.maximum(best_v, top)
    return best_v, best_i, i


@gluon.jit
def _pick_tokens(best_v, best_i, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, G, M, V: gl.constexpr,
                 MB: gl.constexpr, ROWS: gl.constexpr):
    """Publish this program's best per row; the last program to arrive picks each row's token (the first
    index of the maximum over all programs, like torch.argmax) and zeroes the counter."""
    mm = gl.arange(0, MB, layout=ROWS)
    gl.store(best_val_ptr + gl.program_id(0) * MB + mm, best_v)
    gl.store(best_idx_ptr + gl.program_id(0) * MB + mm, best_i)
    _barrier()
    if gl.atomic_add(cnt_ptr, 1, sem="acq_rel") == G - 1:
        LR: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])
        pp = gl.expand_dims(gl.arange(0, 256, layout=gl.SliceLayout(1, LR)), 1)
        mr = gl.expand_dims(gl.arange(0, MB, layout=gl.SliceLayout(0, LR)), 0)
        live = (pp < G) & (mr >= 0)
        vals = gl.load(best_val_ptr + pp * MB + mr, mask=live, other=float("-inf"), cache_modifier=".cg")
        idxs = gl.load(best_idx_ptr + pp * MB + mr, mask=live, other=V, cache_modifier=".cg")
        top = gl.max(vals, axis=0)
        token = gl.min(gl.where(vals == gl.expand_dims(top, 0), idxs, V), axis=0)
        mo = gl.arange(0, MB, layout=gl.SliceLayout(0, LR))
        gl.store(tokens_ptr + mo, token.to(gl.int64), mask=mo < M)
        gl.atomic_xchg(cnt_ptr, 0)


# _loader and _compute take one signature: warp_specialize hands both partitions the same arguments
@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
            part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready, empty,
            xbar, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr,
            NBUF: gl.constexpr, BALANCE: gl.constexpr, V: gl.constexpr):
    i = stream_weights(wq_desc, wo_desc, wg_desc, wd_desc, G, ring, ready, empty, NL, H, I, NQ, NBUF, BALANCE)
    if V > 0:
        pe = _lm_place(G, NQ, H, I, BALANCE)
        for j in range(items(V // BN, G, pe)):
            i = issue_item(wl_desc, (pe + j * G) * BN, 0, i, ring, ready, empty, NBUF)


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
             part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready, empty,
             xbar, NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr,
             NBUF: gl.constexpr, BALANCE: gl.constexpr, V: gl.constexpr):
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, MB, 16])
    ROWS: gl.constexpr = gl.SliceLayout(0, ACC)  # along the batch (acc columns)
    NS: gl.constexpr = I // KS  # down's K slices
    pa, pb, pc, pd = places(G, NQ, H, I, BALANCE)
    r2 = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, ACC)), 1)  # [64, 1] tile row
    m2 = gl.expand_dims(gl.arange(0, MB, layout=ROWS), 0)  # [1, MB] batch row
    ok = (m2 < M) & (r2 >= 0)
    zero = gl.zeros([BN, MB], gl.float32, ACC)
    i = 0
    nx = 0
    for layer in range(NL):
        c0 = layer * 4
        if items(NQ // BN, G, pa) > 0:  # A: q/k/v (norm 1 folded into the weights)
            if layer > 0:
                wait_stage(cnt_ptr, c0 - 1, G)
            rs, nx = _stage(xs, xbar, nx, xh_desc, 0, eps, cnt_ptr, True, MB, ROWS)
            for j in range(items(NQ // BN, G, pa)):
                acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
                gl.store(q_ptr + m2 * NQ + (pa + j * G) * BN + r2, acc * gl.expand_dims(rs, 0), mask=ok)
        signal_stage(cnt_ptr, c0)
        if items(H // BN, G, pb) > 0:  # B: o, into the residual and its shadow
            wait_stage(cnt_ptr, c0, G)
            rs, nx = _stage(xs, xbar, nx, xq_desc, 0, eps, cnt_ptr, False, MB, ROWS)
            for j in range(items(H // BN, G, pb)):
                acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
                dst = m2 * H + (pb + j * G) * BN + r2
                hn = gl.load(h_ptr + dst, mask=ok, other=0.0, cache_modifier=".cg") + acc
                gl.store(h_ptr + dst, hn, mask=ok)
                gl.store(hb_ptr + dst, hn.to(gl.bfloat16), mask=ok)
        signal_stage(cnt_ptr, c0 + 1)
        if items(I // BN, G, pc) > 0:  # C: gate/up (norm 2 folded into the weights)
            wait_stage(cnt_ptr, c0 + 1, G)
            rs, nx = _stage(xs, xbar, nx, xh_desc, 0, eps, cnt_ptr, True, MB, ROWS)
            rs2 = gl.expand_dims(rs, 0)
            for j in range(items(I // BN, G, pc)):
                gate, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
                up, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
                gate = gate * rs2
                gl.store(g_ptr + m2 * I + (pc + j * G) * BN + r2, gate / (1.0 + gl.exp(-gate)) * (up * rs2), mask=ok)
        signal_stage(cnt_ptr, c0 + 2)
        if items((H // BN) * NS, G, pd) > 0:  # D: down, NS K slices a tile, the last one finishes it
            wait_stage(cnt_ptr, c0 + 2, G)
            for j in range(items((H // BN) * NS, G, pd)):
                t = pd + j * G
                rs, nx = _stage(xs, xbar, nx, xg_desc, (t % NS) * KS, eps, cnt_ptr, False, MB, ROWS)
                acc, i = item_chunks(zero, ring, xs, ready, empty, i, NBUF, False)
                _down_tile(acc, t, h_ptr, hb_ptr, part_ptr, cnt_ptr, r2, m2, ok, NL, H, NS, MB)
        signal_stage(cnt_ptr, c0 + 3)
    if V > 0:  # E: lm_head (final norm folded into the weights) and each row's greedy token
        wait_stage(cnt_ptr, 4 * NL - 1, G)
        best_v, best_i, i = _lm_head(i, nx, _lm_place(G, NQ, H, I, BALANCE), G, eps, xs, xbar, ring, ready, empty,
                                     xh_desc, logits_ptr, cnt_ptr, zero, r2, m2, ok, V, NBUF, MB, ROWS)
        _pick_tokens(best_v, best_i, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr + 4 * NL + H // BN, G, M, V,
                     MB, ROWS)


@gluon.jit
def decode_megakernel_wgmma_tma_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc,  # TMA over [NL * N, K] bf16, box [64, 64], 128B swizzle (q/k/v and
                                         # gate/up with the norm weights folded in)
    wl_desc,  # TMA over the lm_head [V, H] bf16 with the final norm folded in (read only when V > 0)
    xq_desc, xh_desc, xg_desc,  # TMA over q_ptr, hb_ptr, g_ptr: box [MB, 64], 128B swizzle
    h_ptr,  # [MB, H] fp32 residual stream (rows < M: in / out)
    hb_ptr,  # [MB, H] bf16 its shadow (rows < M: the input's, on entry; rows >= M zero)
    q_ptr,  # [MB, NQ] bf16 scratch: q/k/v (rows >= M zero)
    g_ptr,  # [MB, I] bf16 scratch: SiLU(gate) x up (rows >= M zero)
    part_ptr,  # [H / 64 * I / 2048, 64, MB] fp32 down partials
    logits_ptr,  # [MB, V] fp32 (V > 0)
    best_val_ptr, best_idx_ptr,  # [G, MB] fp32 / int32 each program's best logit per row (V > 0)
    tokens_ptr,  # [MB] int64 greedy tokens (V > 0)
    cnt_ptr,  # [NL * 4 + H / 64 + 1] int32 grid counters, down-tile arrivals, lm_head arrivals; zero at launch
    eps, G, M,
    NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQ: gl.constexpr, MB: gl.constexpr, NBUF: gl.constexpr,
    BALANCE: gl.constexpr = 1,  # each stage's deal starts where the previous one ended
    V: gl.constexpr = 0,  # vocabulary: > 0 adds the lm_head and the greedy tokens
):
    gl.static_assert(H == KS)  # every item's K slice is the hidden size (down's K is cut into such slices)
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF * 4, BN, BOXK], gl.NVMMASharedLayout(128, 16, rank=2))
    xs = gl.allocate_shared_memory(gl.bfloat16, [KS // BOXK, MB, BOXK], gl.NVMMASharedLayout(128, 16, rank=2))
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    xbar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(NBUF):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    mbarrier.init(xbar.index(0), count=1)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
                    part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready,
                    empty, xbar, NL, H, I, NQ, MB, NBUF, BALANCE, V)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, xq_desc, xh_desc, xg_desc, h_ptr, hb_ptr, q_ptr, g_ptr,
                   part_ptr, logits_ptr, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, eps, G, M, ring, xs, ready,
                   empty, xbar, NL, H, I, NQ, MB, NBUF, BALANCE, V)),
    ], [1], [48])
    for b in gl.static_range(NBUF):
        mbarrier.invalidate(ready.index(b))
        mbarrier.invalidate(empty.index(b))
    mbarrier.invalidate(xbar.index(0))
