"""A program's weight stream in the whole-step decode kernel (decode_step_kernel.py): which 32 KB chunk
(8 TMA boxes of 8 rows x 256 columns) comes i-th, and the loader's TMA issue of it.

Row tiles of every GEMV are dealt round-robin to the G programs; a program's chunks run layer by
layer, stage by stage, then its lm_head tiles:

    layer l:  [ q/k/v tiles | o tiles | MLP tiles: gate (CG chunks), up (CG), down^T (CG) ] ... lm_head tiles
               0            offB      offC                                               P
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import tma_load as _tma_load


@gluon.jit
def locate(i, P, offB, offC, NL: gl.constexpr, CG: gl.constexpr):
    """Chunk i of a program's stream -> (layer, stage 0..3, row tile j, chunk c); stage 3 is lm_head
    (layer == NL), 0-2 are q/k/v, o and the MLP (a tile: CG gate chunks, CG up, CG down^T). Returns r
    (chunk inside the layer) too."""
    layer = gl.minimum(i // P, NL)
    r = i - layer * P
    s = (r >= offB).to(gl.int32) + (r >= offC).to(gl.int32)
    start = gl.where(s == 0, 0, gl.where(s == 1, offB, offC))
    per = gl.where(s == 2, 3 * CG, CG)
    last = layer == NL
    s = gl.where(last, 3, s)
    start = gl.where(last, 0, start)
    per = gl.where(last, CG, per)
    return layer, s, (r - start) // per, (r - start) % per, r


@gluon.jit
def stage_offsets(G, NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, BN: gl.constexpr, CG: gl.constexpr):
    """This program's first chunk of the o and MLP stages inside a layer's chunks, and the layer's chunk
    count (CG chunks per row tile of K = H, 3 CG for an MLP tile)."""
    pid = gl.program_id(0)
    offB = (NQ // BN - pid + G - 1) // G * CG
    offC = offB + (H // BN - pid + G - 1) // G * CG
    return offB, offC, offC + (I // BN - pid + G - 1) // G * 3 * CG


@gluon.jit
def issue_chunk(i, P, offB, offC, G, wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, ring, ready,
           NL: gl.constexpr, NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, BN: gl.constexpr,
           BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    CG: gl.constexpr = H // (BOX * NB)
    layer, s, j, c, _ = locate(i, P, offB, offC, NL, CG)
    row = (gl.program_id(0) + j * G) * BN
    slot = i % NBUF
    bar = ready.index(slot)
    mbarrier.expect(bar, BN * BOX * NB * 2)
    for b in gl.static_range(NB):
        col = ((c % CG) * NB + b) * BOX
        if s == 0:
            _tma_load(wq_desc, [layer * NQ + row, col], bar, ring.index(slot * NB + b))
        elif s == 1:
            _tma_load(wo_desc, [layer * H + row, col], bar, ring.index(slot * NB + b))
        elif (s == 2) & (c < 2 * CG):  # gate rows for the first CG chunks of the tile, then the matching up rows
            _tma_load(wg_desc, [layer * 2 * I + (c // CG) * I + row, col], bar, ring.index(slot * NB + b))
        elif s == 2:  # the same rows of the transposed down projection
            _tma_load(wd_desc, [layer * I + row, col], bar, ring.index(slot * NB + b))
        else:
            _tma_load(wl_desc, [row, col], bar, ring.index(slot * NB + b))


@gluon.jit
def chunk(ringv, ready, empty, i, L4: gl.constexpr, NBUF: gl.constexpr):
    """The i-th chunk of this program's stream, in registers [NB boxes, BN rows, BOX // 8, 8] fp32 (a warp
    per row), its ring slot handed back to the loader."""
    slot = i % NBUF
    mbarrier.wait(ready.index(slot), (i // NBUF) & 1)
    w = ringv.index(slot).load(L4)
    _barrier()  # every warp holds its row of the chunk
    mbarrier.arrive(empty.index(slot), count=1)
    return w.to(gl.float32)


@gluon.jit
def row_tile(ringv, ready, empty, i, x, L4: gl.constexpr, NBUF: gl.constexpr):
    """One row tile (one chunk: K = H) times the staged input x [NB, BOX // 8, 8]: BN outputs, each summed
    inside its warp (the row's products in-thread, then across the lanes)."""
    w = chunk(ringv, ready, empty, i, L4, NBUF)
    return gl.sum(gl.sum(gl.sum(w * gl.expand_dims(x, 1), axis=3), axis=0), axis=1)
