"""The custom ops: torch.library.opcheck (schema, fake impl sizes/strides/dtypes) and semantics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowering.ops  # noqa: F401

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("weight_kn", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_opcheck_and_values(weight_kn, bias):
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    w = torch.randn(24, 40, dtype=torch.float64) if weight_kn else torch.randn(40, 24, dtype=torch.float64)
    b = torch.randn(40, dtype=torch.float64) if bias else None
    args = (x, w, b, weight_kn, "reference")
    torch.library.opcheck(torch.ops.xyserve.gemm.default, args, test_utils=OPCHECK_TESTS)
    want = x @ (w if weight_kn else w.t()) + (b if bias else 0)
    torch.testing.assert_close(torch.ops.xyserve.gemm(*args), want)


MASKS = ["none", "causal", "bool", "additive"]


def _mask(kind: str, b: int, s: int, l: int):
    if kind == "bool":
        m = torch.rand(b, 1, s, l) > 0.3
        m[..., 0] = True  # every row keeps one key (SDPA gives NaN for an all-masked row)
        return m
    if kind == "additive":
        return torch.randn(b, 1, s, l, dtype=torch.float64)
    return None


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_opcheck_and_values(kind, heads):
    hq, hkv = heads
    q = torch.randn(2, hq, 5, 16, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, 7, 16, dtype=torch.float64) for _ in range(2))
    mask = _mask(kind, 2, 5, 7)
    args = (q, k, v, mask, 0.3, kind == "causal", "reference")
    torch.library.opcheck(torch.ops.xyserve.attention.default, args, test_utils=OPCHECK_TESTS)
    rep = hq // hkv
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask,
        is_causal=kind == "causal", scale=0.3,
    )
    torch.testing.assert_close(torch.ops.xyserve.attention(*args), want)


def _paged_inputs(block_size=4, num_blocks=16, hkv=2, hq=4, d=8):
    q_lens, kv_lens = [3, 1, 5], [7, 9, 5]  # chunked prefill on a prefix, decode, fresh prefill
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    table = torch.randperm(num_blocks)[:12].view(3, 4).to(torch.int32)
    kc, vc = (torch.randn(num_blocks, block_size, hkv, d, dtype=torch.float64) for _ in range(2))
    q = torch.randn(sum(q_lens), hq, d, dtype=torch.float64)
    return q, kc, vc, cu, torch.tensor(kv_lens, dtype=torch.int32), table


def test_paged_attention_opcheck_and_matches_dense():
    q, kc, vc, cu, seq_lens, table = _paged_inputs()
    args = (q, kc, vc, cu, seq_lens, table, 0.35, None, None, "reference")
    torch.library.opcheck(torch.ops.xyserve.paged_attention.default, args, test_utils=OPCHECK_TESTS)
    out = torch.ops.xyserve.paged_attention(*args)
    from ascend_kernels.reference import gather_kv

    for b in range(3):
        s, e, n = cu[b].item(), cu[b + 1].item(), seq_lens[b].item()
        k = gather_kv(kc, table[b], n).transpose(0, 1)[None].repeat_interleave(2, 1)
        v = gather_kv(vc, table[b], n).transpose(0, 1)[None].repeat_interleave(2, 1)
        qb = q[s:e].transpose(0, 1)[None]
        mask = torch.ones(e - s, n, dtype=torch.bool).tril(n - (e - s))  # causal, offset by the prefix
        want = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=0.35)[0].transpose(0, 1)
        torch.testing.assert_close(out[s:e], want)


def test_store_kv_opcheck_and_skips_padding():
    kc, vc = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([5, -1, 14])
    torch.library.opcheck(
        torch.ops.xyserve.store_kv.default, (key, value, kc.clone(), vc.clone(), slots, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.ops.xyserve.store_kv(key, value, kc, vc, slots, "reference")
    flat = kc.view(-1, 2, 8)
    torch.testing.assert_close(flat[5], key[0])
    torch.testing.assert_close(flat[14], key[2])
    assert flat.count_nonzero(dim=(1, 2)).nonzero().flatten().tolist() == [5, 14]


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel impl"):
        torch.ops.xyserve.gemm(torch.randn(2, 4), torch.randn(3, 4), None, False, "cuda-magic")


def test_ops_run_with_grad_but_have_no_backward():
    """With inputs that need gradients an op still computes; backward says it is inference-only
    (never silently zero gradients)."""
    x, w = torch.randn(2, 4), torch.randn(3, 4, requires_grad=True)
    out = torch.ops.xyserve.gemm(x, w, None, False, "reference")
    torch.testing.assert_close(out, x @ w.detach().t())
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="xyserve::gemm is inference-only"):
        out.sum().backward()
    with torch.no_grad():
        assert not torch.ops.xyserve.gemm(x, w, None, False, "reference").requires_grad
