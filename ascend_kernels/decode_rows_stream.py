"""The weight stream of the multi-row decode kernels (decode_rows_kernel.py and the layers-only probe
benchmarks/decode_megakernel_mma.py): up to MB = 16 rows per GEMV on tensor cores (`mma_v2`).

A chunk is one row tile of BN = 8 weight rows x KC = 2,048 columns, copied by 32 TMA boxes of [8, 64]
(128 bytes wide: the swizzle that makes `ldmatrix` conflict-free). Warp w owns the columns
(4 w + q) * 64 .. + 63, q = 0..3, of every chunk and of the staged activations:

    ring slot:  [4 (q), NB (w), BN rows, 64 cols] bf16     xs:  [4 (q), NB (w), MB rows, 64 cols] bf16
    per chunk:  acc[w] += xs[q, w] @ ring[q, w]^T   (q = 0..3; a batched mma over the warps)
                out [MB, BN] = sum over warps of acc    (4 KB through shared memory)
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import tma_load as _tma_load

KC = gl.constexpr(2048)  # columns per chunk
BOXK = gl.constexpr(64)  # columns per TMA box
Q = gl.constexpr(4)  # boxes per warp per chunk (KC // (BOXK * 8 warps))


@gluon.jit
def rows_smem(MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr, MAXT: gl.constexpr):
    """The shared memory of a multi-row persistent kernel (decode_rows_kernel.py, the MMA probe): the TMA
    ring (one box per index; 128-byte swizzle, so the pattern repeats every 8 rows, i.e. per box; the
    compute warps see the same bytes as [NBUF * Q, NB, BN, BOXK]), the staged rows xs, the down partials
    dp and the ring's ready / empty barriers, initialised."""
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF * Q * NB, BN, BOXK], gl.NVMMASharedLayout(128, 16, rank=2))
    xs = gl.allocate_shared_memory(gl.bfloat16, [Q, NB, MB, BOXK], gl.NVMMASharedLayout(128, 16, rank=3))
    dp = gl.allocate_shared_memory(gl.float32, [MAXT, MB, BN], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(NBUF):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    return ring, xs, dp, ready, empty


@gluon.jit
def release_ring(ready, empty, NBUF: gl.constexpr):
    """Invalidate the ring's barriers (rows_smem's) after the partitions are done."""
    for b in gl.static_range(NBUF):
        mbarrier.invalidate(ready.index(b))
        mbarrier.invalidate(empty.index(b))


@gluon.jit
def num_tiles(n_rows: gl.constexpr, BN: gl.constexpr, G):
    """This program's row tiles of a GEMV with n_rows outputs (tile t belongs to program t mod G)."""
    return (n_rows // BN - gl.program_id(0) + G - 1) // G


@gluon.jit
def issue_chunk(desc, row, col0, i, ring, ready, empty, NB: gl.constexpr, BN: gl.constexpr, NBUF: gl.constexpr):
    """TMA copies of one chunk (rows row .. row + BN - 1, columns col0 .. col0 + KC - 1) into slot i % NBUF,
    once the compute warps have freed it."""
    slot = i % NBUF
    mbarrier.wait(empty.index(slot), ((i // NBUF) & 1) ^ 1)
    bar = ready.index(slot)
    mbarrier.expect(bar, BN * KC * 2)
    for q in gl.static_range(Q):
        for w in gl.static_range(NB):
            _tma_load(desc, [row, col0 + (w * Q + q) * BOXK], bar, ring.index((slot * Q + q) * NB + w))


@gluon.jit
def _load_slice(src_ptr, stride_m, col0, q, M, MB: gl.constexpr, NB: gl.constexpr):
    """Columns (4 w + q) * 64 .. + 63 of rows 0..M-1 of src[:, col0:] for every warp w: [NB, MB, BOXK] fp32,
    and the columns' offsets [NB, 1, BOXK]; rows past M are zero."""
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 4, 8], [NB, 1, 1], [2, 1, 0])
    ww = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    mm = gl.arange(0, MB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    kk = gl.arange(0, BOXK, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    col = gl.expand_dims(gl.expand_dims(ww * Q + q, 1), 2) * BOXK + gl.expand_dims(gl.expand_dims(kk, 0), 1)
    m3 = gl.expand_dims(gl.expand_dims(mm, 0), 2)
    x = gl.load(src_ptr + m3 * stride_m + col0 + col, mask=(m3 < M) & (col >= 0), other=0.0, cache_modifier=".cg")
    return x.to(gl.float32), col


@gluon.jit
def stage_rows(xs, src_ptr, stride_m, col0, nw_ptr, eps, M, NORM: gl.constexpr, K: gl.constexpr, MB: gl.constexpr,
               NB: gl.constexpr):
    """Rows 0..M-1 of src[:, col0 .. col0 + KC - 1] (fp32 or bf16) into xs as bf16, in the chunk's column
    order (rows past M are zero). With NORM it stages x * nw and returns each row's 1 / rms over K = KC
    columns, [MB] laid out like `chunk_out`'s rows: RMSNorm(x) @ W^T = ((x * nw) @ W^T) / rms, so one
    pass over x does (the scale multiplies the GEMV's outputs). Without NORM it returns ones."""
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 4, 8], [NB, 1, 1], [2, 1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NB, 1, 1], instr_shape=[1, 16, 8])
    ss = gl.zeros([MB], gl.float32, gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    for q in gl.static_range(Q):
        x, col = _load_slice(src_ptr, stride_m, col0, q, M, MB, NB)
        if NORM:
            ss += gl.sum(gl.sum(x * x, axis=2), axis=0)
            x = x * gl.load(nw_ptr + col).to(gl.float32)
        xs.index(q).store(x.to(gl.bfloat16))
    rs = gl.rsqrt(ss / K + eps) if NORM else ss + 1.0
    return gl.convert_layout(rs, gl.SliceLayout(1, gl.SliceLayout(0, MMA)))


@gluon.jit
def chunk_out(ringv, xs, ready, empty, i, MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    """Chunk i times the staged activations: [MB, BN] fp32, summed over the warps' column slices.
    ringv: the ring as [NBUF * Q, NB, BN, BOXK]."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NB, 1, 1], instr_shape=[1, 16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    slot = i % NBUF
    mbarrier.wait(ready.index(slot), (i // NBUF) & 1)
    acc = gl.zeros([NB, MB, BN], gl.float32, MMA)
    for q in gl.static_range(Q):
        a = xs.index(q).load(A)  # [NB, MB, BOXK]
        b = ringv.index(slot * Q + q).permute((0, 2, 1)).load(B)  # [NB, BOXK, BN]
        acc = mma_v2(a, b, acc)
    _barrier()  # every warp has read the slot
    mbarrier.arrive(empty.index(slot), count=1)
    return gl.sum(acc, axis=0)


@gluon.jit
def issue_layer(wq_desc, wo_desc, wg_desc, wd_desc, layer, i, ring, ready, empty, G, NQ: gl.constexpr,
                H: gl.constexpr, I: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    """The loader's chunks of one layer, from chunk i on (returns the next chunk's index): q/k/v tiles, o
    tiles, gate/up tiles (the gate rows, then the same rows of up), then down slice by slice of its K
    (every tile of this program per slice)."""
    pid = gl.program_id(0)
    for j in range(num_tiles(NQ, BN, G)):
        issue_chunk(wq_desc, layer * NQ + (pid + j * G) * BN, 0, i, ring, ready, empty, NB, BN, NBUF)
        i += 1
    for j in range(num_tiles(H, BN, G)):
        issue_chunk(wo_desc, layer * H + (pid + j * G) * BN, 0, i, ring, ready, empty, NB, BN, NBUF)
        i += 1
    for j in range(num_tiles(I, BN, G)):
        issue_chunk(wg_desc, layer * 2 * I + (pid + j * G) * BN, 0, i, ring, ready, empty, NB, BN, NBUF)
        issue_chunk(wg_desc, layer * 2 * I + I + (pid + j * G) * BN, 0, i + 1, ring, ready, empty, NB, BN, NBUF)
        i += 2
    for c in range(I // KC):
        for j in range(num_tiles(H, BN, G)):
            issue_chunk(wd_desc, layer * H + (pid + j * G) * BN, c * KC, i, ring, ready, empty, NB, BN, NBUF)
            i += 1
    return i


@gluon.jit
def add_rows(h_ptr, out, m2, rows, ok, H: gl.constexpr):
    """h[m, rows] += out for the real rows m (this program owns these residual columns)."""
    dst = h_ptr + m2 * H + rows
    gl.store(dst, gl.load(dst, mask=ok, other=0.0, cache_modifier=".cg") + out, mask=ok)


@gluon.jit
def gemv_rows(ringv, xs, ready, empty, i, n_out: gl.constexpr, out_ptr, rs, m2, n2, ok, G, ADD: gl.constexpr,
              MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    """This program's row tiles of a GEMV with n_out outputs over the staged rows, from chunk i on (returns
    the next chunk's index): out[m, tile] = (the tile's products) * rs[m], stored into out_ptr [MB, n_out]
    or, with ADD, added into it (the residual)."""
    for j in range(num_tiles(n_out, BN, G)):
        out = chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF) * rs
        rows = (gl.program_id(0) + j * G) * BN + n2
        if ADD:
            add_rows(out_ptr, out, m2, rows, ok, n_out)
        else:
            gl.store(out_ptr + m2 * n_out + rows, out, mask=ok)
        i += 1
    return i


@gluon.jit
def gate_up_rows(ringv, xs, ready, empty, i, g_ptr, rs, m2, n2, ok, G, I: gl.constexpr, MB: gl.constexpr,
                 BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    """g[m, tile] = SiLU(gate) x up for this program's gate/up row tiles (two chunks each), from chunk i on."""
    for j in range(num_tiles(I, BN, G)):
        gate = chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF) * rs
        up = chunk_out(ringv, xs, ready, empty, i + 1, MB, BN, NB, NBUF) * rs
        gl.store(g_ptr + m2 * I + (gl.program_id(0) + j * G) * BN + n2, gate / (1.0 + gl.exp(-gate)) * up, mask=ok)
        i += 2
    return i


@gluon.jit
def down_rows(ringv, xs, dp, ready, empty, i, g_ptr, h_ptr, eps, M, m2, n2, ok, G, H: gl.constexpr,
              I: gl.constexpr, MB: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    """h[m, tile] += g[m] @ W_down[tile]^T for this program's row tiles, from chunk i on: g is staged a
    slice of KC columns at a time, every tile of the slice follows, and the tiles' partial sums wait in
    dp [tiles, MB, BN] until the last slice."""
    OUT: gl.constexpr = gl.SliceLayout(0, gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NB, 1, 1],
                                                                    instr_shape=[1, 16, 8]))
    for c in range(I // KC):
        _barrier()  # every warp is done with the last slice
        stage_rows(xs, g_ptr, I, c * KC, g_ptr, eps, M, False, KC, MB, NB)
        _barrier()
        for j in range(num_tiles(H, BN, G)):
            out = chunk_out(ringv, xs, ready, empty, i, MB, BN, NB, NBUF)
            part = dp.index(j)
            if c > 0:
                out += part.load(OUT)
            if c == I // KC - 1:
                add_rows(h_ptr, out, m2, (gl.program_id(0) + j * G) * BN + n2, ok, H)
            else:
                part.store(out)
            i += 1
    return i
