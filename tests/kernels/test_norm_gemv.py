"""NormGEMV (residual add + RMSNorm + linear, SiLU x up when gated) and its fallback against the
pure-torch oracle, which follows HF's eager order. On CPU the kernels run in Triton's interpreter."""
from __future__ import annotations

import pytest
import torch

from ascend_kernels import reference
from ascend_kernels.norm_gemv import MAX_ROWS, norm_gemv, norm_linear
from ascend_kernels.rms_norm import add_rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N = 96, 40  # K not a multiple of the 64-wide test tile: the masked K tail runs too


def _inputs(rows, dtype, residual, gated, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    x, r = make(rows, K), (make(rows, K) if residual else None)
    norm_w = (torch.rand(K, generator=g) + 0.5).to(dtype).to(DEVICE)
    w = (make(2 * N if gated else N, K) / K**0.5).contiguous()
    return x, r, norm_w, w


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
def test_norm_gemv_matches_reference(dtype, gated, residual, rows):
    x, r, norm_w, w = _inputs(rows, dtype, residual, gated, seed=rows)
    out, h = norm_gemv(x, r, norm_w, 1e-5, w, gated, block_n=16, block_k=64)
    ref_out, ref_h = reference.norm_linear(x.double(), None if r is None else r.double(), norm_w.double(), 1e-5,
                                           w.double(), gated)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: x + residual itself rounds to 8 bits
    assert out.shape == (rows, N) and out.dtype == dtype
    assert _rel(out, ref_out) < tol
    if residual:
        _assert_model_dtype_add(h, x + r)
    else:
        assert h is None


def _assert_model_dtype_add(h, expected):
    """The new residual stream is the model-dtype add. Triton's CPU interpreter rounds fp32 -> bf16
    toward zero (the GPU rounds to nearest even), so there it may be one bf16 step off."""
    if h.dtype == torch.bfloat16 and h.device.type == "cpu":
        assert torch.allclose(h.float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(h, expected)


def test_norm_gemv_rejects_bad_input():
    x, r, norm_w, w = _inputs(2, torch.float32, True, False)
    with pytest.raises(ValueError, match="at most"):
        norm_gemv(torch.randn(MAX_ROWS + 1, K, device=DEVICE), None, norm_w, 1e-5, w, False)
    with pytest.raises(ValueError, match="do not fit"):
        norm_gemv(x, r, norm_w[:-1], 1e-5, w, False)
    with pytest.raises(ValueError, match="gate and up"):
        norm_gemv(x, r, norm_w, 1e-5, w[:-1], True)
    with pytest.raises(TypeError, match="one dtype"):
        norm_gemv(x, r.double(), norm_w, 1e-5, w, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_add_rms_norm_follows_hf_roundings(dtype, residual):
    x, r, norm_w, _ = _inputs(5, dtype, residual, False)
    a, h = add_rms_norm(x, r, norm_w, 1e-6)
    hh = x + r if residual else x
    hf = hh.float()
    expected = norm_w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.allclose(a.float(), expected.float(), rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-6)
    assert (h is None) == (not residual)
    if residual:
        _assert_model_dtype_add(h, hh)


@pytest.mark.parametrize("rows,dtype", [(MAX_ROWS + 3, torch.float32), (4, torch.float16)])
@pytest.mark.parametrize("gated", [False, True])
def test_norm_linear_falls_back_past_the_row_tile_and_for_fp16(rows, dtype, gated):
    """Prefill-sized batches and fp16 (x * w_norm unnormalised could overflow it) take one add +
    norm kernel, the vendor GEMM and SiLU x up: same results as the oracle."""
    x, r, norm_w, w = _inputs(rows, dtype, True, gated)
    out, h = norm_linear(x, r, norm_w, 1e-5, w, gated)
    ref_out, ref_h = reference.norm_linear(x, r, norm_w, 1e-5, w, gated)
    assert _rel(out, ref_out) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert torch.equal(h, ref_h)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
def test_norm_gemv_chain_in_a_cuda_graph_with_pdl(gated):
    """Programmatic dependent launch inside a captured graph: eight back-to-back NormGEMVs, each
    reading the previous one's outputs, equal the same chain launched plainly (bf16, 1B shapes)."""
    k, steps = 2048, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(2 * k if gated else k, k, device="cuda", generator=g).bfloat16() / k**0.5
               for _ in range(steps)]  # fmt: skip
    norm_w = torch.rand(k, device="cuda", generator=g).bfloat16() + 0.5
    x0, r0 = (torch.randn(2, k, device="cuda", generator=g).bfloat16() for _ in range(2))

    def chain(pdl):
        x, r = x0, r0
        for w in weights:
            x, r = norm_gemv(x, r, norm_w, 1e-5, w, gated, use_pdl=pdl)
        return x, r

    plain = chain(False)
    chain(True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(True)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, plain))


def test_tiles_fit_shared_memory():
    """fp32 weights take half the 16-bit K tile; a small budget (A100-sized, 163 KB) shrinks the
    pipeline before the tile. The 16-bit defaults are the ones measured on an H100."""
    from ascend_kernels.norm_gemv import fit_tiles

    hopper = 227 * 1024
    assert fit_tiles(32, 256, 4, False, 2, hopper) == (256, 4)
    assert fit_tiles(64, 256, 3, True, 2, hopper) == (256, 3)
    assert fit_tiles(64, 128, 3, True, 4, hopper) == (128, 3)
    block_k, stages = fit_tiles(64, 256, 3, True, 2, 163 * 1024)
    assert (16 + 128) * block_k * 2 * stages <= 163 * 1024 - 8 * 1024 and stages == 2
