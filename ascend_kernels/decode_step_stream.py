"""A program's weight stream in the whole-step decode kernel (decode_step_kernel.py): which 32 KB chunk
(8 TMA boxes of 8 rows x 256 columns: one row tile over the whole hidden size) comes i-th, the loader's
TMA issue of it, and the compute warps' side of the ring.

Row tiles of the q/k/v and o GEMVs are dealt round-robin to the G programs. The MLP and lm_head tiles
are dealt the same way but for the last few a program would get: those wait in a pool (a counter per
layer, and one for the lm_head), and the loader takes one at a time while its ring has room. Programs
stream at different rates (a 64-program grid's MLP ended ~150 us a step later with every tile dealt,
benchmarks/RESULTS.md), so the fast ones take more and the stage ends together. A program's chunks:

    layer l:  [ q/k/v | o | MLP dealt: gate, up, down^T per tile | MLP pooled ... | stop ] ... lm_head dealt,
              lm_head pooled ... | stop

A pooled tile's first chunk carries a tag (its first row) in `tags[slot]`; `stop` is a slot with no
chunk whose tag is -1: the pool was empty.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import tma_load as _tma_load

MLP_POOL = gl.constexpr(2)  # MLP tiles a program leaves to its layer's pool (the rest are dealt)
LM_POOL = gl.constexpr(0)  # lm_head tiles the same (the pool also takes the tiles G does not divide)


@gluon.jit
def grab(ptr):
    """Lane 0 takes a number from the pool counter at ptr (atomic add of 1). The old value lands in lane
    0's register when the atomic returns; nothing waits for it until `lane0` reads it, so the loader
    asks for its next tile while it issues this one."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 l; mov.u32 l, %laneid; setp.eq.u32 p, l, 0; mov.u32 $0, 0; "
        "@p atom.global.relaxed.gpu.add.u32 $0, [$1], 1; }", "=r,l", [ptr], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def lane0(x):
    """Lane 0's value of x in every lane of the (one-warp) loader."""
    return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, 0, 0x1f, -1;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def issue_rows(i, desc, row, ring, ready, empty, tags, TAG: gl.constexpr, BN: gl.constexpr, BOX: gl.constexpr,
               NB: gl.constexpr, NBUF: gl.constexpr):
    """Chunk i: rows [row, row + BN) of desc over the whole hidden size into ring slot i % NBUF, once the
    compute warps have freed it; with TAG the slot's tag is `row` (a pooled tile's first chunk)."""
    slot = i % NBUF
    mbarrier.wait(empty.index(slot), ((i // NBUF) & 1) ^ 1)
    if TAG:  # the expect's arrive releases the store to the warps that wait for the slot
        tags.index(slot).store(gl.full([1], row, gl.int32, gl.BlockedLayout([1], [32], [1], [0])))
    bar = ready.index(slot)
    mbarrier.expect(bar, BN * BOX * NB * 2)
    for b in gl.static_range(NB):
        _tma_load(desc, [row, b * BOX], bar, ring.index(slot * NB + b))
    return i + 1


@gluon.jit
def issue_stop(i, ready, empty, tags, NBUF: gl.constexpr):
    """Slot i % NBUF carries no chunk, only the tag -1: the stage's pool is empty."""
    slot = i % NBUF
    mbarrier.wait(empty.index(slot), ((i // NBUF) & 1) ^ 1)
    tags.index(slot).store(gl.full([1], -1, gl.int32, gl.BlockedLayout([1], [32], [1], [0])))
    mbarrier.arrive(ready.index(slot), count=1)
    return i + 1


@gluon.jit
def _stream_mlp(i, layer, pool, G, wg_desc, wd_desc, ring, ready, empty, tags, I: gl.constexpr, BN: gl.constexpr,
                BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    """A layer's MLP chunks: the dealt tiles, then tiles from the pool until it is empty, then stop."""
    pid = gl.program_id(0)
    dealt = gl.maximum((I // BN) // G - MLP_POOL, 0)
    for j in range(dealt):
        row = (pid + j * G) * BN
        i = issue_rows(i, wg_desc, layer * 2 * I + row, ring, ready, empty, tags, False, BN, BOX, NB, NBUF)
        i = issue_rows(i, wg_desc, layer * 2 * I + I + row, ring, ready, empty, tags, False, BN, BOX, NB, NBUF)
        i = issue_rows(i, wd_desc, layer * I + row, ring, ready, empty, tags, False, BN, BOX, NB, NBUF)
    k = lane0(grab(pool))
    while k < I // BN - dealt * G:
        nxt = grab(pool)
        row = (dealt * G + k) * BN
        i = issue_rows(i, wg_desc, layer * 2 * I + row, ring, ready, empty, tags, True, BN, BOX, NB, NBUF)
        i = issue_rows(i, wg_desc, layer * 2 * I + I + row, ring, ready, empty, tags, False, BN, BOX, NB, NBUF)
        i = issue_rows(i, wd_desc, layer * I + row, ring, ready, empty, tags, False, BN, BOX, NB, NBUF)
        k = lane0(nxt)
    return issue_stop(i, ready, empty, tags, NBUF)


@gluon.jit
def stream_weights(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, cnt_ptr, G, ring, tags, ready, empty,
                   NL: gl.constexpr, NQ: gl.constexpr, H: gl.constexpr, I: gl.constexpr, V: gl.constexpr,
                   BN: gl.constexpr, BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr):
    """The loader warp: every chunk of this program's step in stream order. The pools' counters are
    cnt[4 NL + 1 + layer] (MLP) and cnt[5 NL + 1] (lm_head), zero at launch."""
    pid = gl.program_id(0)
    nq, no = (NQ // BN - pid + G - 1) // G, (H // BN - pid + G - 1) // G
    i = 0
    for layer in range(NL):
        for j in range(nq):
            i = issue_rows(i, wq_desc, layer * NQ + (pid + j * G) * BN, ring, ready, empty, tags, False, BN, BOX,
                           NB, NBUF)
        for j in range(no):
            i = issue_rows(i, wo_desc, layer * H + (pid + j * G) * BN, ring, ready, empty, tags, False, BN, BOX,
                           NB, NBUF)
        i = _stream_mlp(i, layer, cnt_ptr + 4 * NL + 1 + layer, G, wg_desc, wd_desc, ring, ready, empty, tags,
                        I, BN, BOX, NB, NBUF)
    dealt = gl.maximum((V // BN) // G - LM_POOL, 0)
    for j in range(dealt):
        i = issue_rows(i, wl_desc, (pid + j * G) * BN, ring, ready, empty, tags, False, BN, BOX, NB, NBUF)
    k = lane0(grab(cnt_ptr + 5 * NL + 1))
    while k < V // BN - dealt * G:
        nxt = grab(cnt_ptr + 5 * NL + 1)
        i = issue_rows(i, wl_desc, (dealt * G + k) * BN, ring, ready, empty, tags, True, BN, BOX, NB, NBUF)
        k = lane0(nxt)
    issue_stop(i, ready, empty, tags, NBUF)


@gluon.jit
def pooled_tag(tags, ready, i, NB: gl.constexpr, NBUF: gl.constexpr):
    """The compute warps' side of a pool: wait for slot i % NBUF and read its tag (a pooled tile's first
    row, or -1: stop)."""
    slot = i % NBUF
    mbarrier.wait(ready.index(slot), (i // NBUF) & 1)
    return gl.max(tags.index(slot).load(gl.BlockedLayout([1], [32], [NB], [0])), axis=0)


@gluon.jit
def release(empty, i, NBUF: gl.constexpr):
    """Hand slot i % NBUF back to the loader without reading a chunk from it (a stop slot)."""
    _barrier()  # every warp has read the slot's tag
    mbarrier.arrive(empty.index(i % NBUF), count=1)


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


@gluon.jit
def mlp_tile(dacc, ringv, ready, empty, i, x, L4: gl.constexpr, LB: gl.constexpr, GB: gl.constexpr,
             NBUF: gl.constexpr):
    """One MLP tile from chunks i .. i + 2: gate and up rows, then SiLU(gate) x up times the same rows of
    down^T, added into the partial down sums."""
    gate = row_tile(ringv, ready, empty, i, x, L4, NBUF)
    up = row_tile(ringv, ready, empty, i + 1, x, L4, NBUF)
    g = gl.convert_layout(gate / (1.0 + gl.exp(-gate)) * up, GB)  # every thread all BN rows
    g4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(g, 0), 2), 3)
    return dacc + gl.sum(chunk(ringv, ready, empty, i + 2, LB, NBUF) * g4, axis=1)


@gluon.jit
def mlp_chunks(x, i, G, ringv, tags, ready, empty, I: gl.constexpr, BN: gl.constexpr, BOX: gl.constexpr,
               NB: gl.constexpr, NBUF: gl.constexpr, L4: gl.constexpr, LB: gl.constexpr, XB: gl.constexpr,
               GB: gl.constexpr):
    """The MLP's partial down sums over this program's tiles: the dealt ones, then the pooled ones the
    loader took until its stop slot. Returns them and the next chunk index."""
    dacc = gl.zeros([NB, BOX // 8, 8], gl.float32, XB)
    for j in range(gl.maximum((I // BN) // G - MLP_POOL, 0)):
        dacc = mlp_tile(dacc, ringv, ready, empty, i, x, L4, LB, GB, NBUF)
        i += 3
    tag = pooled_tag(tags, ready, i, NB, NBUF)
    while tag >= 0:
        dacc = mlp_tile(dacc, ringv, ready, empty, i, x, L4, LB, GB, NBUF)
        i += 3
        tag = pooled_tag(tags, ready, i, NB, NBUF)
    release(empty, i, NBUF)
    return dacc, i + 1


@gluon.jit
def _lm_tile(x, r, i, best_v, best_i, logits_ptr, ringv, ready, empty, BN: gl.constexpr, NBUF: gl.constexpr,
             L4: gl.constexpr, ROWS: gl.constexpr):
    """Logits of rows r .. r + BN - 1 from chunk i, and each row slot's best so far (a program's tiles
    come in row order, so a strict > keeps the first maximum)."""
    rows = r + gl.arange(0, BN, layout=ROWS)
    val = row_tile(ringv, ready, empty, i, x, L4, NBUF)
    gl.store(logits_ptr + rows, val)
    return gl.maximum(val, best_v), gl.where(val > best_v, rows, best_i)


@gluon.jit
def lm_chunks(x, i, G, logits_ptr, ringv, tags, ready, empty, V: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr,
              NBUF: gl.constexpr, L4: gl.constexpr, ROWS: gl.constexpr):
    """The lm_head's logits of this program's tiles, dealt then pooled, and each row slot's best logit and
    its first index."""
    best_v = gl.full([BN], float("-inf"), gl.float32, ROWS)
    best_i = gl.zeros([BN], gl.int32, ROWS)
    for j in range(gl.maximum((V // BN) // G - LM_POOL, 0)):
        best_v, best_i = _lm_tile(x, (gl.program_id(0) + j * G) * BN, i, best_v, best_i, logits_ptr, ringv, ready,
                                  empty, BN, NBUF, L4, ROWS)
        i += 1
    r = pooled_tag(tags, ready, i, NB, NBUF)
    while r >= 0:
        best_v, best_i = _lm_tile(x, r, i, best_v, best_i, logits_ptr, ringv, ready, empty, BN, NBUF, L4, ROWS)
        i += 1
        r = pooled_tag(tags, ready, i, NB, NBUF)
    release(empty, i, NBUF)
    return best_v, best_i
