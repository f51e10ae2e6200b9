"""A whole batch-1 decode step of a Llama-style decoder in ONE persistent launch (sm_90, Gluon).

Launched by decode_step.py; the engine runs its batch-1 decode steps on it with
`decode_megakernel=True` (engine/decode_kernel.py). It grew out of the layers-only probe in
benchmarks/decode_megakernel.py (the 16 layers' GEMVs) by adding RoPE, the paged KV cache write,
split-KV attention (decode_step_attention.py), the final norm, lm_head and the greedy token. Each
program starts by loading its residual rows of the token's embedding; the last program to finish
picks the token (argmax over the programs' best logits) and, in a decode loop (PICK 2), steps the
position for the next launch.

Per layer the grid passes four counters (a fire-and-forget `red.release` per program, polled with
acquire loads), one per stage:

    qkv GEMV (norm 1) -> attention (no weights) -> o GEMV (+ h) -> MLP: gate/up GEMV (norm 2), down (+ h)
    ... 16 layers ... -> lm_head GEMV (final norm) -> logits [V] fp32

A chunk is one row tile (BN = 8 rows x the whole hidden size, 8 TMA boxes of 256 columns). The compute
warps read it a warp per row, so a GEMV output never leaves its warp (in-thread products, then a
shuffle sum over the lanes): no shared-memory reduction or barrier per tile beyond the one that frees
the ring slot.

The MLP is one stage: a program's gate/up row tile gives 8 values of SiLU(gate) x up, which it multiplies
at once into the same 8 rows of the transposed down projection (split-K over the MLP width). Those
chunks are read a warp per box, each thread all 8 rows of its 8 columns, so the partial down output
sums over the rows in registers across the program's tiles; at the stage's end every thread adds its
columns into the residual with fp32 atomics (the sum's order varies between runs: the last bits of h
do too). The MLP normalises the residual after attention (h_attn) while the partials land in h, so no
program reads h while another adds to it:

    o stage:  h_attn[rows] = h[rows] = h[rows] + o[rows]      (each program its own rows)
    MLP:      xs = RMSNorm(h_attn);  h += sum over programs of down^T[tile rows]^T (SiLU(gate) x up)[tile rows]

The loader warp streams only the GEMVs' weights, so while the compute warps do attention the next
o / gate/up chunks keep arriving. The last MLP and lm_head tiles of each program wait in a pool that the
loaders take from while their rings have room (decode_step_stream.py): the programs stream at different
rates, and the stage then ends when the grid's weights are read, not when the slowest program's are.

Attention task p < NQH * ns: q head p // ns over one ns-th of the positions (split-KV; ns = NSPLIT, or
2 NSPLIT from position 256 NSPLIT on where the grid has the programs: long contexts need the
parallelism, short ones do not gain from it); it writes an unnormalised partial (acc, max, sum) that the
o stage merges while it stages its input. The new token's K/V come from the q/k/v scratch (RoPE in
registers), not from the cache: the first program of each KV head stores them for later steps.

    k_cache, v_cache: [NL, num_blocks, BS, NKV, D] bf16 (the engine's per-layer layout, stacked)
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ascend_kernels.decode_step_attention import attention_split, stage_merge
from ascend_kernels.decode_step_layout import stage_layout as _stage_layout
from ascend_kernels.decode_step_stream import lm_chunks, mlp_chunks, stream_weights
from ascend_kernels.decode_step_stream import row_tile as _row_tile
from ascend_kernels.gluon_compat import cta_barrier as _barrier
from ascend_kernels.gluon_compat import smem_view as _view
from ascend_kernels.grid_sync import signal_stage, wait_stage

LOG2E = 1.4426950408889634


@gluon.jit
def _stage_norm(xs, src_ptr, nw, eps, K: gl.constexpr, NB: gl.constexpr):
    x = gl.load(src_ptr + _stage_layout(K, NB), cache_modifier=".cg").to(gl.float32)
    xs.store(x * gl.rsqrt(gl.sum(gl.sum(x * x, axis=1), axis=0) / K + eps) * nw)


@gluon.jit
def _finish_step(best_v, best_i, best_val_ptr, best_idx_ptr, cnt_ptr, token_ptr, tokens_out_ptr, pos_ptr, pos,
                 G, NL: gl.constexpr, V: gl.constexpr, NB: gl.constexpr, PICK: gl.constexpr):
    """After the lm_head the last program to arrive zeroes the counters for the next launch. With PICK it
    also picks the greedy token (first index of the maximum over the programs' best logits, like
    torch.argmax without NaN): PICK 1 writes it to tokens_out[0] (the engine's sampler takes it for
    greedy rows), PICK 2 drives a decode loop: the token becomes the next launch's input, tokens_out[pos]
    records it and the position steps."""
    pid = gl.program_id(0)
    if PICK > 0:
        gl.store(best_val_ptr + pid, best_v)
        gl.store(best_idx_ptr + pid, best_i)
    _barrier()
    if gl.atomic_add(cnt_ptr + NL * 4, 1, sem="acq_rel") == G - 1:  # every other program is done
        LG: gl.constexpr = gl.BlockedLayout([1], [32], [NB], [0])
        p = gl.arange(0, 32 * NB, layout=LG)
        if PICK > 0:
            vals = gl.load(best_val_ptr + p, mask=p < G, other=float("-inf"), cache_modifier=".cg")
            idxs = gl.load(best_idx_ptr + p, mask=p < G, other=V, cache_modifier=".cg")
            top = gl.max(vals, axis=0)
            token = gl.min(gl.where(vals == top, idxs, V), axis=0)
            if PICK == 1:
                gl.store(tokens_out_ptr, token.to(gl.int64))
            else:
                gl.store(token_ptr, token.to(token_ptr.dtype.element_ty))
                gl.store(tokens_out_ptr + pos, token.to(gl.int64))
                gl.store(pos_ptr, pos + 1)
        gl.store(cnt_ptr + p, gl.zeros_like(p), mask=p < NL * 5 + 2)


@gluon.jit
def _own_rows(h_ptr, pid, no, G, L4: gl.constexpr, BN: gl.constexpr):
    """The residual rows of this program's o tiles, [NB tiles (no used), BN] fp32. Nothing writes them
    between the q/k/v stage and this program's o stage, so they load while attention runs."""
    L2: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))
    jj = gl.arange(0, L4.size_per_thread[0], layout=gl.SliceLayout(1, L2))
    rr = gl.arange(0, BN, layout=gl.SliceLayout(0, L2))
    rows = gl.expand_dims((pid + jj * G) * BN, 1) + gl.expand_dims(rr, 0)
    return gl.load(h_ptr + rows, mask=gl.expand_dims(jj < no, 1), other=0.0, cache_modifier=".cg")


@gluon.jit
def _row_of(own, j, ROWS: gl.constexpr):
    """Tile j's rows of `_own_rows` in the layout of a row tile's outputs."""
    jj = gl.arange(0, own.shape[0], layout=gl.SliceLayout(1, own.type.layout))
    return gl.convert_layout(gl.sum(gl.where(gl.expand_dims(jj == j, 1), own, 0.0), axis=0), ROWS)


# _loader and _compute take one signature: warp_specialize hands both partitions the same arguments
@gluon.jit
def _loader(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, h_ptr, ha_ptr, qkv_ptr, part_ptr, logits_ptr, n1_ptr,
            n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, pos_ptr, inv_freq_ptr, cnt_ptr,
            token_ptr, tokens_out_ptr, embed_ptr,
            best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale, layer_stride, G, ring, xs, tags, ready, empty,
            NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NQH: gl.constexpr,
            NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, NSPLIT: gl.constexpr, T: gl.constexpr,
            BN: gl.constexpr, BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr, PICK: gl.constexpr):
    stream_weights(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, cnt_ptr, G, ring, tags, ready, empty,
                   NL, (NQH + 2 * NKV) * D, H, I, V, BN, BOX, NB, NBUF)


@gluon.jit
def _stage_start(layer, s: gl.constexpr, ci, pos, ns, token, xs, h_ptr, ha_ptr, qkv_ptr, part_ptr, n1_ptr, n2_ptr,
                 nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, inv_freq_ptr, cnt_ptr, embed_ptr, eps, rope_scale,
                 qk_scale, layer_stride, G, H: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr,
                 D: gl.constexpr, BS: gl.constexpr, NSPLIT: gl.constexpr, T: gl.constexpr, NB: gl.constexpr):
    """Stage s (0 q/k/v, 1 o, 2 MLP, 3 lm_head) starts: (attention before the o GEMV,) wait for counter
    ci - 1 (the previous stage), then stage this GEMV's input in xs (RMS-normalised but for o)."""
    kk = _stage_layout(H, NB)  # norm weights first: they do not depend on the grid
    if s == 0:
        nw = gl.load(n1_ptr + layer * H + kk).to(gl.float32)
    elif s == 2:
        nw = gl.load(n2_ptr + layer * H + kk).to(gl.float32)
    elif s == 3:
        nw = gl.load(nf_ptr + kk).to(gl.float32)
    if s == 1:  # attention between the q/k/v and o GEMVs (programs without a split only sign in)
        if gl.program_id(0) < NQH * ns:
            attention_split(layer, qkv_ptr, part_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, pos, inv_freq_ptr,
                            rope_scale, qk_scale, layer_stride, cnt_ptr, ci - 2, G, ns, NQH, NKV, D, BS, T, NB)
        signal_stage(cnt_ptr, ci - 1)
    if ci > 0:
        wait_stage(cnt_ptr, ci - 1, G)
    _barrier()  # every warp has its copy of the previous stage's input
    if s == 1:
        stage_merge(xs, part_ptr, ns, H, D, NSPLIT, NB)
    elif s == 2:
        _stage_norm(xs, ha_ptr, nw, eps, H, NB)
    elif s == 3:
        _stage_norm(xs, h_ptr, nw, eps, H, NB)
    elif layer == 0:  # the first norm reads the token's embedding row
        _stage_norm(xs, embed_ptr + token * H, nw, eps, H, NB)
    else:
        _stage_norm(xs, h_ptr, nw, eps, H, NB)
    _barrier()


@gluon.jit
def _mlp_flush(dacc, h_ptr, BOX: gl.constexpr, NB: gl.constexpr, XB: gl.constexpr):
    """Add this program's partial down sums [NB, BOX // 8, 8] (each thread its own 8 columns) into the residual."""
    wb = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, XB)))
    tt = gl.arange(0, BOX // 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, XB)))
    ee = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, XB)))
    cols = (gl.expand_dims(gl.expand_dims(wb, 1), 2) * BOX + gl.expand_dims(gl.expand_dims(tt, 0), 2) * 8
            + gl.expand_dims(gl.expand_dims(ee, 0), 1))
    gl.atomic_add(h_ptr + cols, dacc, sem="relaxed")


@gluon.jit
def _compute(wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, h_ptr, ha_ptr, qkv_ptr, part_ptr, logits_ptr, n1_ptr,
             n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, pos_ptr, inv_freq_ptr, cnt_ptr,
             token_ptr, tokens_out_ptr, embed_ptr,
             best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale, layer_stride, G, ring, xs, tags, ready, empty,
             NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NQH: gl.constexpr,
             NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, NSPLIT: gl.constexpr, T: gl.constexpr,
             BN: gl.constexpr, BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr, PICK: gl.constexpr):
    NQ: gl.constexpr = (NQH + 2 * NKV) * D
    gl.static_assert(H // BN <= NB * NQH * NSPLIT)  # o tiles a program (G >= NQH NSPLIT) fit _own_rows
    # a chunk [NB boxes, BN rows, BOX columns] in registers: warp r holds row r, each thread 8 columns of
    # every box, so a row's sum never leaves its warp
    L4: gl.constexpr = gl.BlockedLayout([NB, 1, 1, 8], [1, 1, 32, 1], [1, NB, 1, 1], [3, 2, 1, 0])
    XL: gl.constexpr = gl.SliceLayout(1, L4)
    ROWS: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(0, gl.SliceLayout(3, L4)))
    # down^T chunks go the other way: warp b holds box b, each thread all BN rows of its 8 columns, so the
    # partial down sums over the rows stay in-thread
    LB: gl.constexpr = gl.BlockedLayout([1, BN, 1, 8], [1, 1, 32, 1], [NB, 1, 1, 1], [3, 2, 1, 0])
    XB: gl.constexpr = gl.SliceLayout(1, LB)
    GB: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LB)))
    pid = gl.program_id(0)
    ringv = _view(ring, gl.bfloat16, [NBUF, NB, BN, BOX // 8, 8], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    xsv = _view(xs, gl.float32, [NB, BOX // 8, 8], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    rows_in = gl.arange(0, BN, layout=ROWS)
    nq, no = (NQ // BN - pid + G - 1) // G, (H // BN - pid + G - 1) // G  # this program's row tiles
    pos = gl.load(pos_ptr)
    token = gl.load(token_ptr).to(gl.int64)
    ns = gl.where((pos >= 256 * NSPLIT) & (G >= 2 * NSPLIT * NQH), 2 * NSPLIT, NSPLIT)  # attention splits
    for j in range(no):  # the residual rows this program owns (the o stage)
        rows = (pid + j * G) * BN + rows_in
        gl.store(h_ptr + rows, gl.load(embed_ptr + token * H + rows).to(gl.float32))
    i = 0
    for layer in range(NL):
        _stage_start(layer, 0, 4 * layer, pos, ns, token, xs, h_ptr, ha_ptr, qkv_ptr, part_ptr, n1_ptr, n2_ptr,
                     nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, inv_freq_ptr, cnt_ptr, embed_ptr, eps, rope_scale,
                     qk_scale, layer_stride, G, H, NQH, NKV, D, BS, NSPLIT, T, NB)
        x = xsv.load(XL)
        for j in range(nq):
            gl.store(qkv_ptr + (pid + j * G) * BN + rows_in, _row_tile(ringv, ready, empty, i, x, L4, NBUF))
            i += 1
        signal_stage(cnt_ptr, 4 * layer)
        h_own = _own_rows(h_ptr, pid, no, G, L4, BN)  # loads under attention, not one round trip a tile
        _stage_start(layer, 1, 4 * layer + 2, pos, ns, token, xs, h_ptr, ha_ptr, qkv_ptr, part_ptr, n1_ptr,
                     n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, inv_freq_ptr, cnt_ptr, embed_ptr, eps,
                     rope_scale, qk_scale, layer_stride, G, H, NQH, NKV, D, BS, NSPLIT, T, NB)
        x = xsv.load(XL)
        for j in range(no):  # o: the residual after attention, in h (the MLP adds into it) and h_attn
            rows = (pid + j * G) * BN + rows_in
            res = _row_of(h_own, j, ROWS) + _row_tile(ringv, ready, empty, i, x, L4, NBUF)
            gl.store(h_ptr + rows, res)
            gl.store(ha_ptr + rows, res)
            i += 1
        signal_stage(cnt_ptr, 4 * layer + 2)
        _stage_start(layer, 2, 4 * layer + 3, pos, ns, token, xs, h_ptr, ha_ptr, qkv_ptr, part_ptr, n1_ptr,
                     n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, inv_freq_ptr, cnt_ptr, embed_ptr, eps,
                     rope_scale, qk_scale, layer_stride, G, H, NQH, NKV, D, BS, NSPLIT, T, NB)
        dacc, i = mlp_chunks(xsv.load(XL), i, G, ringv, tags, ready, empty, I, BN, BOX, NB, NBUF, L4, LB, XB, GB)
        _mlp_flush(dacc, h_ptr, BOX, NB, XB)
        signal_stage(cnt_ptr, 4 * layer + 3)
    _stage_start(NL, 3, 4 * NL, pos, ns, token, xs, h_ptr, ha_ptr, qkv_ptr, part_ptr, n1_ptr, n2_ptr, nf_ptr,
                 k_cache_ptr, v_cache_ptr, bt_ptr, inv_freq_ptr, cnt_ptr, embed_ptr, eps, rope_scale, qk_scale,
                 layer_stride, G, H, NQH, NKV, D, BS, NSPLIT, T, NB)
    best_v, best_i = lm_chunks(xsv.load(XL), i, G, logits_ptr, ringv, tags, ready, empty, V, BN, NB, NBUF, L4,
                                ROWS)
    top = gl.max(best_v, axis=0)
    _finish_step(top, gl.min(gl.where(best_v == top, best_i, V), axis=0), best_val_ptr, best_idx_ptr, cnt_ptr,
                 token_ptr, tokens_out_ptr, pos_ptr, pos, G, NL, V, NB, PICK)


@gluon.jit
def decode_step_kernel(
    wq_desc, wo_desc, wg_desc, wd_desc, wl_desc,  # TMA over [NL * N, K] bf16 (q;k;v, o, gate;up, down^T), lm [V, H]
    h_ptr,  # [H] fp32 residual stream (scratch; the last residual out)
    ha_ptr,  # [H] fp32 the residual after attention (the MLP's input)
    qkv_ptr,  # [NQ] fp32 scratch
    part_ptr,  # [NQH, 2 NSPLIT, D + 2] fp32 attention partials (acc, max, sum)
    logits_ptr,  # [V] fp32
    n1_ptr, n2_ptr, nf_ptr,  # [NL, H], [NL, H], [H] bf16 norm weights
    k_cache_ptr, v_cache_ptr,  # [NL, num_blocks, BS, NKV, D] bf16
    bt_ptr,  # [max_blocks] int32 the request's block table
    pos_ptr,  # [1] int32 the new token's position
    inv_freq_ptr,  # [D / 2] fp32 RoPE frequencies (the model's, scaling included)
    cnt_ptr,  # [NL * 5 + 2] int32: 4 NL + 1 grid counters, then the MLP / lm_head tile pools; zero at launch (left zero)
    token_ptr,  # [1] int32 / int64: the step's input token (PICK 2: the next step's is written back)
    tokens_out_ptr,  # int64: PICK 1 [1] the greedy token; PICK 2 [max_len + 1], [pos] = the token after pos
    embed_ptr,  # [V, H] bf16 token embedding
    best_val_ptr, best_idx_ptr,  # [G] fp32 / int32 per-program best logit (PICK)
    eps, rope_scale, qk_scale, layer_stride, G,
    NL: gl.constexpr, H: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NQH: gl.constexpr, NKV: gl.constexpr,
    D: gl.constexpr, BS: gl.constexpr, NSPLIT: gl.constexpr, T: gl.constexpr, BN: gl.constexpr,
    BOX: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr, PICK: gl.constexpr,
):
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF * NB, BN, BOX], gl.NVMMASharedLayout(0, 16, rank=2))
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    xs = gl.allocate_shared_memory(gl.float32, [H // 8, 8], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    tags = gl.allocate_shared_memory(gl.int32, [NBUF, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))  # pooled tiles
    for b in gl.static_range(NBUF):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    gl.warp_specialize([
        (_compute, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, h_ptr, ha_ptr, qkv_ptr, part_ptr, logits_ptr, n1_ptr,
                    n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, pos_ptr, inv_freq_ptr, cnt_ptr,
                    token_ptr, tokens_out_ptr, embed_ptr, best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale,
                    layer_stride, G, ring, xs, tags, ready, empty,
                    NL, H, I, V, NQH, NKV, D, BS, NSPLIT, T, BN, BOX, NB, NBUF, PICK)),
        (_loader, (wq_desc, wo_desc, wg_desc, wd_desc, wl_desc, h_ptr, ha_ptr, qkv_ptr, part_ptr, logits_ptr, n1_ptr,
                   n2_ptr, nf_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, pos_ptr, inv_freq_ptr, cnt_ptr,
                   token_ptr, tokens_out_ptr, embed_ptr, best_val_ptr, best_idx_ptr, eps, rope_scale, qk_scale,
                   layer_stride, G, ring, xs, tags, ready, empty,
                   NL, H, I, V, NQH, NKV, D, BS, NSPLIT, T, BN, BOX, NB, NBUF, PICK)),
    ], [1], [48])
    for b in gl.static_range(NBUF):
        mbarrier.invalidate(ready.index(b))
        mbarrier.invalidate(empty.index(b))
