"""Meta-attention kernel vs the pure-torch reference and float64 SDPA (Triton CPU interpreter)."""
import dataclasses
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from ascend_kernels import arrival_counters, attention, reference
from ascend_kernels.profiles import CPU_INTERPRETER
from ascend_kernels.tiling import build_task_table, plan

TOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def paged_batch(gen, specs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, pad_rows=0):
    """Random queries and a shuffled paged cache for requests given as (q_len, kv_len)."""
    blocks = [-(-kv // block_size) for _, kv in specs]
    num_blocks = sum(blocks) + 2
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.zeros(len(specs), max(blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        block_table[b, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q_lens = [q for q, _ in specs]
    q = torch.randn(sum(q_lens) + pad_rows, num_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + [sum(q_lens[:i + 1]) for i in range(len(q_lens))], dtype=torch.int32)
    seq_lens = torch.tensor([kv for _, kv in specs], dtype=torch.int32)
    return q, k_cache, v_cache, cu, seq_lens, block_table


def fp64_paged(q, k_cache, v_cache, cu, seq_lens, block_table, scale, tree_mask=None):
    """Independent oracle: float64 SDPA per request with an explicit visibility mask."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[2]
    for b in range(len(seq_lens)):
        start, end, kv = int(cu[b]), int(cu[b + 1]), int(seq_lens[b])
        n = end - start
        k = reference.gather_kv(k_cache.double(), block_table[b], kv).repeat_interleave(group, 1)
        v = reference.gather_kv(v_cache.double(), block_table[b], kv).repeat_interleave(group, 1)
        visible = torch.ones(n, kv, dtype=torch.bool).tril(kv - n)
        if tree_mask is not None:
            visible[:, kv - n:] = tree_mask[start:end, :n]
        o = F.scaled_dot_product_attention(q[start:end].double().transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), attn_mask=visible, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def random_specs(rng, count):
    """A random mix of prefill, chunked prefill, decode and linear verify requests."""
    specs = []
    for _ in range(count):
        kind = rng.choice(["prefill", "chunked", "decode", "verify"])
        if kind == "prefill":
            n = rng.randint(2, 40)
            specs.append((n, n))
        elif kind == "chunked":
            specs.append((rng.randint(2, 30), 0))
            specs[-1] = (specs[-1][0], specs[-1][0] + rng.randint(1, 60))
        elif kind == "decode":
            specs.append((1, rng.randint(1, 90)))
        else:
            n = rng.randint(2, 5)
            specs.append((n, n + rng.randint(0, 60)))
    return specs


def assert_close(out, ref, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) rows"
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"{what}: max error {err}"


@pytest.mark.parametrize("group,block_size,head_dim,dtype", [
    (1, 16, 64, torch.float32), (4, 32, 128, torch.float32), (8, 16, 80, torch.float32),
    (4, 16, 64, torch.float16), (8, 32, 96, torch.bfloat16), (2, 32, 256, torch.float32),
])
def test_paged_random_mix(group, block_size, head_dim, dtype):
    gen = torch.Generator().manual_seed(1000 * group + head_dim)
    rng = random.Random(head_dim + group)
    num_kv_heads = 2 if group < 8 else 1
    specs = random_specs(rng, 6)
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
                                          head_dim=head_dim, block_size=block_size, dtype=dtype, pad_rows=3)
    scale = 1 / math.sqrt(head_dim)
    poisoned = torch.full(q.shape[:2] + (head_dim,), float("nan"), dtype=dtype)
    out = attention.paged_attention(q, kc, vc, cu, lens, bt, scale, out=poisoned)
    real = int(cu[-1])
    assert (out[real:] == 0).all(), "padding rows past the last request must be zero"
    assert_close(out[:real], reference.paged_attention(q, kc, vc, cu, lens, bt, scale)[:real], dtype, "vs reference")
    assert_close(out[:real], fp64_paged(q, kc, vc, cu, lens, bt, scale)[:real], dtype, "vs fp64")


def tree_mask_for(rng, q_lens, max_q):
    """Each draft token's parent is an earlier token; a token sees itself and its ancestors."""
    rows = []
    for n in q_lens:
        parents = [-1] + [rng.randrange(0, i) for i in range(1, n)]
        for i in range(n):
            row = [False] * max_q
            j = i
            while j >= 0:
                row[j] = True
                j = parents[j]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("prebuilt", [False, True])
def test_paged_tree_verify(prebuilt):
    gen = torch.Generator().manual_seed(7)
    rng = random.Random(7)
    specs = [(5, 40), (1, 23), (7, 7), (4, 61)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=8, num_kv_heads=2, head_dim=64,
                                          block_size=16, dtype=torch.float32)
    tree = tree_mask_for(rng, [s[0] for s in specs], max_q=8)
    table = None
    if prebuilt:
        table = build_task_table([s[0] for s in specs], [s[1] for s in specs], ["verify", "decode", "verify", "verify"],
                                 num_q_heads=8, num_kv_heads=2, head_dim=64, device="cpu", tree=True)
    out = attention.paged_attention(q, kc, vc, cu, lens, bt, 0.125, tree, table,
                                    out=torch.full_like(q, float("nan")))
    assert_close(out, reference.paged_attention(q, kc, vc, cu, lens, bt, 0.125, tree), torch.float32, "tree vs ref")
    assert_close(out, fp64_paged(q, kc, vc, cu, lens, bt, 0.125, tree), torch.float32, "tree vs fp64")


def test_split_kv_long_decodes_merge_and_reset():
    gen = torch.Generator().manual_seed(3)
    specs = [(1, 300), (2, 190)]  # 2 tasks for 4 programs: both must be cut along KV
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=8, num_kv_heads=1, head_dim=64,
                                          block_size=16, dtype=torch.float32)
    p = plan([1, 2], [300, 190], num_q_heads=8, num_kv_heads=1, head_dim=64, profile=CPU_INTERPRETER)
    assert p.num_partials > 0 and any(t.num_splits > 1 for t in p.tasks), "few long decodes must split KV"
    ref = fp64_paged(q, kc, vc, cu, lens, bt, 0.125)
    for _ in range(2):  # the second launch proves the arrival counters were reset
        out = attention.paged_attention(q, kc, vc, cu, lens, bt, 0.125, None, p.tensor(),
                                        out=torch.full_like(q, float("nan")))
        assert_close(out, ref, torch.float32, "split-KV")
    assert arrival_counters.all_zero()


@pytest.mark.parametrize("kv_tile,small_kv_tile,chunk_tiles,page", [
    (64, 128, 32, 16), (64, 64, 16, 16), (64, 128, 1, 16), (64, 16, 16, 1024), (64, 256, 16, 128),
    (16, 16, 4, 16), (16, 64, 2, 32), (128, 16, 3, 48), (16, 128, 1, 16)])
def test_chunks_of_the_paged_paths_fit_their_block_table_slice(kv_tile, small_kv_tile, chunk_tiles, page):
    """The kernel gathers a chunk's block ids from CHUNK_PAGES entries read at the chunk's start:
    whole KV tiles of each path per chunk, a power-of-two entry count, and every page the chunk
    touches from any offset inside its first page among them."""
    tiles = dataclasses.replace(CPU_INTERPRETER.attention_tiles(64), kv_tile=kv_tile, small_kv_tile=small_kv_tile,
                                kv_chunk_tiles=chunk_tiles, decode_kv_tile=128)
    large, small, decode, pages = attention.chunk_shape(tiles, page)
    assert pages & (pages - 1) == 0
    for chunk, tile in ((large, kv_tile), (small, small_kv_tile), (decode, 128)):
        assert chunk >= tile and chunk % tile == 0
        assert all((offset + chunk - 1) // page < pages for offset in range(page))


@pytest.mark.parametrize("head_dim,elem_bytes,want,want_decode", [
    (64, 2, 128, 128), (128, 2, 128, 64), (64, 4, 128, 64), (128, 4, 64, 32), (80, 4, 64, 32), (256, 2, 64, 32),
    (256, 4, 32, 16)])
def test_small_kv_tile_narrows_for_wide_elements(head_dim, elem_bytes, want, want_decode):
    """A pipelined small-path stage (K and V tile) keeps to SMALL_STAGE_BYTES: fp32 rows of
    128 dims get half the bf16 tile width (GH100 profiles: 128-wide for bf16)."""
    from ascend_kernels.profiles import H200
    tiles = H200.attention_tiles(head_dim)
    fitted = attention.fit_small_tile(tiles, head_dim, elem_bytes)
    assert fitted.small_kv_tile == want
    memory = H200.for_batch(1, 1).attention_tiles(head_dim)  # decode batches: 128-wide tiles before fitting
    assert attention.fit_small_tile(memory, head_dim, elem_bytes).decode_kv_tile == want_decode
    assert (fitted.large_rows, fitted.small_rows, fitted.kv_tile) == (tiles.large_rows, tiles.small_rows, tiles.kv_tile)


@pytest.mark.parametrize("chunk_tiles", [0, 1, 4, 64])
def test_block_table_chunking_gives_the_same_numbers(monkeypatch, chunk_tiles):
    """Paged tiles of both paths read the block table per chunk (or per tile with 0); the chunk
    length changes where the reads happen, never the result."""
    gen = torch.Generator().manual_seed(21)
    specs = [(70, 70), (33, 150), (1, 90), (5, 64), (1, 230)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=8, num_kv_heads=2, head_dim=32,
                                          block_size=16, dtype=torch.float32)
    prof = dataclasses.replace(CPU_INTERPRETER, kv_chunk_tiles=chunk_tiles)
    monkeypatch.setattr(attention, "profile_for", lambda device=None: prof)
    out = attention.paged_attention(q, kc, vc, cu, lens, bt, 0.2, out=torch.full_like(q, float("nan")))
    assert_close(out, fp64_paged(q, kc, vc, cu, lens, bt, 0.2), torch.float32, f"{chunk_tiles}-tile chunks")


def test_cache_positions_past_a_request_are_never_read_into_its_result():
    """Blocks and slots a request does not own hold NaN (freed pages, other requests' garbage):
    decodes, verifies, a split-KV decode and a chunked prefill must not see them, though the
    small path reads whole KV tiles past the request's end."""
    gen = torch.Generator().manual_seed(11)
    specs = [(1, 37), (1, 300), (3, 50), (2, 17), (20, 61)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=8, num_kv_heads=2, head_dim=32,
                                          block_size=16, dtype=torch.float32)
    spare = int(next(i for i in range(kc.shape[0]) if not (bt == i).any()))
    bt = torch.where(bt == 0, spare, bt)  # block 0 (where masked block-table reads point) is free
    kc[[0, spare]], vc[[0, spare]] = kc[[spare, 0]], vc[[spare, 0]]
    owned = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for b, (_, kv) in enumerate(specs):
        for j in range(kv):
            owned[bt[b, j // 16], j % 16] = True
    kc[~owned], vc[~owned] = float("nan"), float("nan")
    ref = fp64_paged(q, kc, vc, cu, lens, bt, 0.2)
    assert not ref.isnan().any()
    out = attention.paged_attention(q, kc, vc, cu, lens, bt, 0.2, out=torch.full_like(q, float("nan")))
    assert_close(out, ref, torch.float32, "NaN outside the requests")


def test_naive_schedule_same_numbers():
    gen = torch.Generator().manual_seed(5)
    specs = [(9, 30), (1, 44), (2, 20)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=4, num_kv_heads=1, head_dim=64,
                                          block_size=16, dtype=torch.float16)
    naive = plan([9, 1, 2], [30, 44, 20], num_q_heads=4, num_kv_heads=1, head_dim=64,
                 profile=CPU_INTERPRETER, schedule="naive")
    out = attention.paged_attention(q, kc, vc, cu, lens, bt, 0.125, None, naive.tensor())
    assert_close(out, fp64_paged(q, kc, vc, cu, lens, bt, 0.125), torch.float16, "naive plan")


def sdpa64(q, k, v, mask, scale, is_causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    mask = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, scale=scale, is_causal=is_causal)


@pytest.mark.parametrize("case", ["causal_square", "causal_short_q", "causal_long_q", "pad_bool", "additive_hf",
                                  "gqa_plain", "decode_long", "strided_q", "strided_kv", "gapped_kv"])
def test_dense_attention(case):
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    b, hq, hkv, s, length, d = 2, 4, 2, 19, 19, 64
    mask, causal, dtype = None, False, torch.float32
    if case == "causal_square":
        causal = True
    elif case == "causal_short_q":
        s, length, causal, dtype = 5, 37, True, torch.float16
    elif case == "causal_long_q":
        s, length, causal = 40, 23, True
    elif case == "gqa_plain":
        hq, hkv, d, dtype = 8, 1, 80, torch.bfloat16
    elif case == "decode_long":
        b, s, length = 1, 1, 400
    q = torch.randn(b, hq, s, d, generator=gen).to(dtype)
    if case == "strided_q":  # HF's [B, S, H, D] -> transpose(1, 2) layout
        q = torch.randn(b, s, hq, d, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    if case == "strided_kv":  # HF's [B, L, Hkv, D] -> transpose(1, 2): the other compiled-in layout
        causal = True
        k = torch.randn(b, length, hkv, d, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(b, length, hkv, d, generator=gen).to(dtype).transpose(1, 2)
        assert attention.kv_layout(k, v, paged=False) == 3
    if case == "gapped_kv":  # rows with a gap after each head dim: run-time strides
        causal = True
        k = torch.randn(b, hkv, length, d + 16, generator=gen).to(dtype)[..., :d]
        v = torch.randn(b, hkv, length, d + 16, generator=gen).to(dtype)[..., :d]
        assert attention.kv_layout(k, v, paged=False) == 0
    if case == "pad_bool":  # left padding of batch row 1 plus causal, as a bool keep-mask
        mask = torch.ones(s, length, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
        mask[1, :, :, :6] = False
        mask[1, :, 2, :] = False  # a fully masked row: SDPA returns zeros
    elif case == "additive_hf":
        mask = torch.zeros(b, 1, s, length)
        mask.masked_fill_(torch.ones(s, length, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
        mask[0, :, :, :4] = torch.finfo(torch.float32).min
        mask += torch.randn(b, 1, s, length, generator=gen) * 0.5
    poisoned = torch.full((b, hq, s, d), float("nan"), dtype=dtype)
    out = attention.dense_attention(q, k, v, mask, None, causal, out=poisoned)
    assert out.is_contiguous() and out.shape == (b, hq, s, d)
    assert_close(out, reference.dense_attention(q, k, v, mask, None, causal), dtype, f"{case} vs reference")
    assert_close(out, sdpa64(q, k, v, mask, 1 / math.sqrt(d), causal), dtype, f"{case} vs fp64")


def test_dense_fallback_warns_once_and_matches():
    q = torch.randn(1, 2, 3, 300)  # head dim beyond the kernel's limit
    k, v = torch.randn(1, 2, 4, 300), torch.randn(1, 2, 4, 300)
    attention._warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = attention.dense_attention(q, k, v, None, None, False)
        attention.dense_attention(q, k, v, None, None, False)
    assert sum("reference" in str(w.message) for w in seen) == 1
    torch.testing.assert_close(out, reference.dense_attention(q, k, v, None, None, False))


def test_paged_cache_with_gaps_between_blocks_falls_back_and_matches():
    """The kernel addresses a cache row as block * block_size + slot; a cache view whose blocks
    are not consecutive rows (here one spare row per block) must take the reference path."""
    gen = torch.Generator().manual_seed(5)
    specs = [(40, 70), (1, 33)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=4, num_kv_heads=2, head_dim=32,
                                          block_size=16, dtype=torch.float32)
    padded_k, padded_v = (torch.full((c.shape[0], 17) + c.shape[2:], float("nan")) for c in (kc, vc))
    padded_k[:, :16], padded_v[:, :16] = kc, vc
    attention._warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = attention.paged_attention(q, padded_k[:, :16], padded_v[:, :16], cu, lens, bt, 0.2)
    assert any("consecutive rows" in str(w.message) for w in seen)
    assert_close(out, fp64_paged(q, kc, vc, cu, lens, bt, 0.2), torch.float32, "gapped cache")


def test_cache_views_with_run_time_strides_match():
    """Contiguous caches compile their strides in; views with gaps between heads or tokens (blocks
    still consecutive rows) take the run-time strides and give the same numbers."""
    gen = torch.Generator().manual_seed(9)
    specs = [(37, 37), (1, 50), (4, 29)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=4, num_kv_heads=2, head_dim=32,
                                          block_size=16, dtype=torch.float32)
    wide_d = torch.full(kc.shape[:3] + (48,), float("nan"))  # head stride 48, not 32
    wide_h = torch.full(kc.shape[:2] + (3, 32), float("nan"))  # token stride 3 heads, not 2
    ref = fp64_paged(q, kc, vc, cu, lens, bt, 0.2)
    for buf, view in ((wide_d, lambda t: t[..., :32]), (wide_h, lambda t: t[:, :, :2])):
        k_view, v_view = view(buf.clone()), view(buf.clone())
        k_view.copy_(kc)
        v_view.copy_(vc)
        assert not k_view.is_contiguous() and k_view.stride(0) == 16 * k_view.stride(1)
        out = attention.paged_attention(q, k_view, v_view, cu, lens, bt, 0.2, out=torch.full_like(q, float("nan")))
        assert_close(out, ref, torch.float32, f"cache strides {tuple(k_view.stride())}")


def test_a_non_positive_scale_falls_back_and_the_launcher_refuses_it():
    """The unmasked loop scales the row max after taking it, right only for scale > 0."""
    gen = torch.Generator().manual_seed(13)
    specs = [(9, 20), (1, 17)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=4, num_kv_heads=2, head_dim=32,
                                          block_size=16, dtype=torch.float32)
    attention._warned.clear()
    for scale in (0.0, -0.3):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = attention.paged_attention(q, kc, vc, cu, lens, bt, scale)
        assert any("scale" in str(w.message) for w in seen)
        assert_close(out, fp64_paged(q, kc, vc, cu, lens, bt, scale), torch.float32, f"scale {scale}")
    ops = attention.Operands(block_table=bt, cu_seqlens_q=cu, tree=q.new_empty(0, dtype=torch.uint8),
                             mask=q.new_empty(0), mask_kind=0, paged=True, causal=True, num_requests=len(specs),
                             seq_lens=lens)
    p = plan([s[0] for s in specs], [s[1] for s in specs], num_q_heads=4, num_kv_heads=2, head_dim=32,
             profile=CPU_INTERPRETER)
    with pytest.raises(ValueError, match="positive softmax scale"):
        attention.launch(q, kc, vc, torch.empty_like(q), p.tensor(), ops, -0.3, tiles=p.tiles, profile=CPU_INTERPRETER)


def test_custom_ops_dispatch_to_the_kernel():
    import lowering.ops  # noqa: F401  (registers torch.ops.xyserve.*)

    gen = torch.Generator().manual_seed(11)
    q, kc, vc, cu, lens, bt = paged_batch(gen, [(3, 20), (1, 9)], num_heads=4, num_kv_heads=2, head_dim=64,
                                          block_size=16, dtype=torch.float32)
    args = (q, kc, vc, cu, lens, bt, 0.125, None, None, "triton")
    torch.library.opcheck(torch.ops.xyserve.paged_attention.default, args)
    assert_close(torch.ops.xyserve.paged_attention(*args), fp64_paged(q, kc, vc, cu, lens, bt, 0.125),
                 torch.float32, "xyserve::paged_attention")
    qd, kd, vd = (torch.randn(1, 4, 5, 64, generator=gen) for _ in range(3))
    dense_args = (qd, kd, vd, None, None, True, "triton")
    torch.library.opcheck(torch.ops.xyserve.attention.default, dense_args)
    assert_close(torch.ops.xyserve.attention(*dense_args), sdpa64(qd, kd, vd, None, 0.125, True),
                 torch.float32, "xyserve::attention")


@pytest.mark.parametrize("plan_variant,run_variant", [("compute", "memory"), ("memory", "compute")])
def test_table_of_the_other_variant_gives_the_same_numbers(plan_variant, run_variant):
    """The launcher picks its variant from padded shapes, the planner from real lengths: a table
    with taller tiles than the kernel's must still be walked completely."""
    gen = torch.Generator().manual_seed(13)
    specs = [(30, 50), (1, 40), (3, 33)]
    q, kc, vc, cu, lens, bt = paged_batch(gen, specs, num_heads=8, num_kv_heads=2, head_dim=64,
                                          block_size=16, dtype=torch.float32)
    variants = {"compute": CPU_INTERPRETER, "memory": CPU_INTERPRETER.for_batch(1, 1)}
    assert variants["memory"].attention_tiles(64).large_rows < CPU_INTERPRETER.attention_tiles(64).large_rows
    pinned = variants[plan_variant]
    p = plan([s[0] for s in specs], [s[1] for s in specs], num_q_heads=8, num_kv_heads=2, head_dim=64,
             profile=dataclasses.replace(pinned, memory_overrides=()))
    run = variants[run_variant]
    ops = attention.Operands(block_table=bt, cu_seqlens_q=cu, tree=q.new_empty(0, dtype=torch.uint8),
                             mask=q.new_empty(0), mask_kind=0, paged=True, causal=True, num_requests=len(specs),
                             seq_lens=lens)
    out = attention.launch(q, kc, vc, torch.full_like(q, float("nan")), p.tensor(), ops, 0.125,
                           tiles=run.attention_tiles(64), profile=run)
    assert_close(out, fp64_paged(q, kc, vc, cu, lens, bt, 0.125), torch.float32, f"{plan_variant} table on {run_variant}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_every_dtype_and_head_dim_compiles_and_matches_on_the_gpu(dtype, head_dim):
    """Both kernel variants (a mixed batch runs the compute one, a decode batch the memory one)
    must fit the GPU's shared memory for every dtype and head dim, paged and dense."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    gen = torch.Generator().manual_seed(31)
    scale = head_dim ** -0.5
    for specs in ([(40, 300), (1, 700), (3, 200), (100, 100)], [(1, 700), (1, 333)]):
        batch = paged_batch(gen, specs, num_heads=8, num_kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype)
        ref = fp64_paged(*batch, scale)
        q, kc, vc, cu, lens, bt = (t.cuda() for t in batch)
        out = attention.paged_attention(q, kc, vc, cu, lens, bt, scale, out=torch.full_like(q, float("nan")))
        assert_close(out.cpu(), ref, dtype, f"paged {specs}")
    for q_len, kv_len in ((1, 300), (64, 64)):
        q, k, v = (torch.randn(2, h, n, head_dim, generator=gen).to(dtype)
                   for h, n in ((8, q_len), (2, kv_len), (2, kv_len)))
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=q_len > 1,
                                              enable_gqa=True)
        got = attention.dense_attention(q.cuda(), k.cuda(), v.cuda(), None, None, q_len > 1)
        assert_close(got.cpu(), want, dtype, f"dense {q_len}x{kv_len}")


@pytest.mark.gpu
def test_a_table_captured_by_a_cuda_graph_outlives_the_plan_cache():
    """Dense tables are cached per shape and the cache is bounded; one a CUDA graph recorded is
    read on every replay, so evicting it would let the graph read freed memory."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, n, 64, generator=gen).to(torch.bfloat16).cuda() for h, n in ((8, 1), (2, 77), (2, 77)))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    attention.dense_attention(q, k, v, None, None, False)  # warm-up: plans the table (no copies while capturing)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.dense_attention(q, k, v, None, None, False)
    for kv_len in range(100, 400):  # more shapes than the cache keeps
        kk = torch.empty(1, 2, kv_len, 64, dtype=torch.bfloat16, device="cuda")
        attention.dense_attention(q, kk, kk, None, None, False)
    assert len(attention._dense_plans) <= 258
    torch.cuda.synchronize()
    out.zero_()
    graph.replay()
    assert_close(out.cpu(), want.cpu(), torch.bfloat16, "replayed after eviction")
