"""The weight stream of the swap-AB wgmma multi-row decode kernels (decode_rows_wgmma_kernel.py and the
probes benchmarks/decode_megakernel_wgmma*.py): up to MB = 16 rows per GEMV, each 64-row weight tile the
wgmma A operand read straight from the TMA ring, the rows the N = 16 B operand; one warpgroup owns a tile
over its whole K, so nothing is reduced across warps.

    chunk (32 KB):  W[row .. row + 63, k0 .. k0 + 255]  as 4 TMA boxes [64, 64] (128-byte swizzle)
    xs (64 KB):     the staged activations [16, 2048] bf16 as 32 boxes [16, 64]
    per chunk:      acc[64, 16] += box_b @ xs[kb + b]^T      (4 wgmma m64n16k16 x 4 k-steps)

An item is one tile over a 2,048-wide K slice (8 chunks). Per layer, each stage's items are dealt
round-robin to the G programs (`places`): q/k/v (NQ / 64 items), o (H / 64), gate/up (I / 64 items of
a gate tile and the same rows of up) and down (H / 64 tiles x I / 2048 K slices, each tile finished by
its last slice to arrive: `down_tile`). A stage's input is staged once per item into xs, by TMA from
bf16 rows its producer wrote (`stage_tma`) or through registers (`stage_regs`, which can apply a norm
weight on the way).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import tma_load as _tma_load

BN = gl.constexpr(64)  # tile rows: the wgmma M
BOXK = gl.constexpr(64)  # columns per TMA box (128 bytes of bf16)
CB = gl.constexpr(4)  # boxes per chunk: 256 columns, 32 KB
KS = gl.constexpr(2048)  # K of an item (the staged activations' width)


@gluon.jit
def items(n: gl.constexpr, G, p):
    """Items of a stage with n items that the program at place p of the stage gets (items p, p + G, ...)."""
    return (n - p + G - 1) // G


@gluon.jit
def places(G, NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, BALANCE: gl.constexpr):
    """This program's place in each stage's round-robin deal. BALANCE starts each stage's deal where
    the previous stage's ended, so the few q/k/v and o items land on different programs (and those
    programs' loaders are free to fill their rings with the next stage meanwhile)."""
    pid = gl.program_id(0)
    if BALANCE:
        na: gl.constexpr = NQ // BN
        nb: gl.constexpr = H // BN
        nc: gl.constexpr = I // BN
        return (pid, (pid - na % G + G) % G, (pid - (na + nb) % G + G) % G, (pid - (na + nb + nc) % G + G) % G)
    else:
        return (pid, pid, pid, pid)


@gluon.jit
def issue_item(desc, row, k0, i, ring, ready, empty, NBUF: gl.constexpr):
    """The loader: the 8 chunks of rows [row, row + 64) x columns [k0, k0 + 2048) from ring position i."""
    for c in range(KS // (CB * BOXK)):
        slot = i % NBUF
        mbarrier.wait(empty.index(slot), ((i // NBUF) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, CB * BN * BOXK * 2)
        for b in gl.static_range(CB):
            _tma_load(desc, [row, k0 + (c * CB + b) * BOXK], bar, ring.index(slot * CB + b))
        i += 1
    return i


@gluon.jit
def stream_weights(wq_desc, wo_desc, wg_desc, wd_desc, G, ring, ready, empty, NL: gl.constexpr, H: gl.constexpr,
                   I: gl.constexpr, NQ: gl.constexpr, NBUF: gl.constexpr, BALANCE: gl.constexpr):
    """The loader warp: every chunk of this program's items, stage by stage, layer by layer; returns the
    ring position after the last."""
    pa, pb, pc, pd = places(G, NQ, H, I, BALANCE)
    i = 0
    for layer in range(NL):
        for j in range(items(NQ // BN, G, pa)):
            i = issue_item(wq_desc, layer * NQ + (pa + j * G) * BN, 0, i, ring, ready, empty, NBUF)
        for j in range(items(H // BN, G, pb)):
            i = issue_item(wo_desc, layer * H + (pb + j * G) * BN, 0, i, ring, ready, empty, NBUF)
        for j in range(items(I // BN, G, pc)):
            row = layer * 2 * I + (pc + j * G) * BN
            i = issue_item(wg_desc, row, 0, i, ring, ready, empty, NBUF)
            i = issue_item(wg_desc, row + I, 0, i, ring, ready, empty, NBUF)
        for j in range(items((H // BN) * (I // KS), G, pd)):
            t = pd + j * G
            i = issue_item(wd_desc, layer * H + (t // (I // KS)) * BN, (t % (I // KS)) * KS, i, ring, ready, empty,
                           NBUF)
    return i


@gluon.jit
def item_chunks(acc, ring, xs, ready, empty, i, NBUF: gl.constexpr, DEFER: gl.constexpr):
    """acc [64, 16] += this item's 8 chunks (ring positions i ..) times xs^T; returns (acc, next i).
    DEFER: a chunk's slot is handed back once the next chunk's wgmmas are issued (one chunk in flight)."""
    for c in range(KS // (CB * BOXK)):
        slot = i % NBUF
        mbarrier.wait(ready.index(slot), (i // NBUF) & 1)
        for b in gl.static_range(CB):
            acc = warpgroup_mma(ring.index(slot * CB + b), xs.index(c * CB + b).permute((1, 0)), acc, is_async=True)
        if DEFER:
            acc = warpgroup_mma_wait(CB, deps=(acc, ))
            if c > 0:
                mbarrier.arrive(empty.index((i + NBUF - 1) % NBUF), count=1)
        else:
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index(slot), count=1)
        i += 1
    if DEFER:
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((i + NBUF - 1) % NBUF), count=1)
    return acc, i


@gluon.jit
def stage_regs(xs, src_ptr, stride_m, col0, nw_ptr, eps, M, NORM: gl.constexpr, MB: gl.constexpr, ROWS: gl.constexpr):
    """Rows 0..M-1 of src[:, col0 .. col0 + 2047] into xs as bf16 (x * nw with NORM); returns each row's
    1 / rms over those columns (ones without NORM) in the accumulator's column layout ROWS."""
    XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    _barrier()  # every warp's wgmmas have read the last staged rows
    mm = gl.expand_dims(gl.arange(0, MB, layout=gl.SliceLayout(1, XL)), 1)
    kk = gl.expand_dims(gl.arange(0, BOXK, layout=gl.SliceLayout(0, XL)), 0)
    ss = gl.zeros([MB], gl.float32, gl.SliceLayout(1, XL))
    for b in gl.static_range(KS // BOXK):
        x = gl.load(src_ptr + mm * stride_m + col0 + b * BOXK + kk, mask=(mm < M) & (kk >= 0), other=0.0,
                    cache_modifier=".cg").to(gl.float32)
        if NORM:
            ss += gl.sum(x * x, axis=1)
            x = x * gl.load(nw_ptr + b * BOXK + kk).to(gl.float32)
        xs.index(b).store(x.to(gl.bfloat16))
    fence_async_shared()  # the stores above are read by wgmma (the async proxy)
    _barrier()
    rs = gl.rsqrt(ss / KS + eps) if NORM else ss + 1.0
    return gl.convert_layout(rs, ROWS)


@gluon.jit
def fence_proxy_global(ptr):
    """Order the generic-proxy stores this program has acquired (other programs' outputs) before the
    async-proxy (TMA) reads that follow."""
    gl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r,l", [ptr], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def stage_tma(xs, xbar, nx, desc, col0, eps, cnt_ptr, NORM: gl.constexpr, MB: gl.constexpr, ROWS: gl.constexpr):
    """Columns col0 .. col0 + 2047 of desc's [MB, N] bf16 rows into xs (staging number nx); returns each
    row's 1 / rms over them (ones without NORM) in the accumulator's column layout, and nx + 1."""
    _barrier()  # every warp's wgmmas have read the last staged rows
    fence_proxy_global(cnt_ptr)
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
def down_tile(acc, t, h_ptr, hb_ptr, part_ptr, tile_cnt_ptr, r2, m2, ok, H: gl.constexpr, NS: gl.constexpr,
              MB: gl.constexpr):
    """Slice t % NS of down tile t // NS: publish the partial; the tile's last slice to arrive (counter
    tile_cnt[tile], left zero) adds all of them (in slice order) into h and writes h's bf16 shadow."""
    tile = t // NS
    offs = r2 * MB + m2  # [64, MB] within a partial
    gl.store(part_ptr + t * (BN * MB) + offs, acc)
    _barrier()  # every thread's partial precedes the release below
    if gl.atomic_add(tile_cnt_ptr + tile, 1, sem="acq_rel") == NS - 1:
        tot = gl.load(part_ptr + tile * NS * (BN * MB) + offs, cache_modifier=".cg")
        for s in gl.static_range(1, NS):
            tot += gl.load(part_ptr + (tile * NS + s) * (BN * MB) + offs, cache_modifier=".cg")
        dst = m2 * H + tile * BN + r2
        hn = gl.load(h_ptr + dst, mask=ok, other=0.0, cache_modifier=".cg") + tot
        gl.store(h_ptr + dst, hn, mask=ok)
        gl.store(hb_ptr + dst, hn.to(gl.bfloat16), mask=ok)
        gl.atomic_xchg(tile_cnt_ptr + tile, 0)  # zero for the next launch


@gluon.jit
def lm_place(G, NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, BALANCE: gl.constexpr):
    """This program's place in the lm_head's deal (after the last layer's down items with BALANCE)."""
    off = (NQ // BN + H // BN + I // BN + (H // BN) * (I // KS)) % G if BALANCE else 0
    return (gl.program_id(0) - off + G) % G


@gluon.jit
def lm_tiles(i, pe, G, rs, ring, xs, ready, empty, logits_ptr, zero, r2, m2, ok, V: gl.constexpr, NBUF: gl.constexpr,
             MB: gl.constexpr, ROWS: gl.constexpr):
    """Logits of this program's lm_head tiles over the staged final-norm rows (row scales rs) and, per batch
    row, the best logit and its first index over them; returns (best, index, next ring position)."""
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
def pick_tokens(best_v, best_i, best_val_ptr, best_idx_ptr, tokens_ptr, cnt_ptr, G, M, V: gl.constexpr,
                MB: gl.constexpr, ROWS: gl.constexpr, reset_ptr, NRESET: gl.constexpr, LOOP: gl.constexpr = False,
                ids_ptr=None, pos_ptr=None, slot_ptr=None, bt_ptr=None, bt_stride=0, BS: gl.constexpr = 16):
    """Publish this program's best per row; the last program to arrive picks each row's token (the first
    index of the maximum over all programs, like torch.argmax), zeroes its counter and the NRESET
    counters at reset_ptr (every program has passed them). LOOP (a burst's launch): it also writes each
    row's token over its input id and steps its position and slot (bt: [rows, bt_stride] int32 block
    tables of BS-token blocks) for the next launch; every program has read them by then."""
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
        if LOOP:
            gl.store(ids_ptr + mo, token.to(gl.int64), mask=mo < M)
            p = gl.load(pos_ptr + mo, mask=mo < M, other=0) + 1
            gl.store(pos_ptr + mo, p, mask=mo < M)
            # a burst's last launch may step a row to max_model_len, one column past its table: no read
            blk = gl.load(bt_ptr + mo * bt_stride + p // BS, mask=(mo < M) & (p // BS < bt_stride), other=0)
            gl.store(slot_ptr + mo, blk.to(gl.int64) * BS + p % BS, mask=mo < M)
        for c0 in gl.static_range(0, NRESET, 256):
            c = c0 + gl.arange(0, 256, layout=gl.SliceLayout(1, LR))
            gl.store(reset_ptr + c, gl.zeros_like(c), mask=c < NRESET)
        gl.atomic_xchg(cnt_ptr, 0)

