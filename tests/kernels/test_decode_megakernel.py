"""The decode megakernel probe (benchmarks/decode_megakernel.py): its configuration checks, an sm_90
compile in a fresh process (Gluon has no CPU interpreter; this catches API drift in CI's Triton), and on
a Hopper GPU its result against a float32 reference of the same 16 layers."""

import pytest
import torch

from benchmarks import bench_megakernel
from benchmarks.bench_megakernel import MegakernelConfig
from benchmarks.common import rel_err
from tests.kernels.compile_megakernel_sm90 import assert_compiles
from tests.sm90 import requires_sm90


def test_config_checks():
    assert MegakernelConfig().m == 1
    with pytest.raises(ValueError, match="m must be 1 or 2"):
        MegakernelConfig(m=3)
    with pytest.raises(ValueError, match="must divide"):
        MegakernelConfig(box=384)
    with pytest.raises(ValueError, match="shared memory"):
        MegakernelConfig(m=2, num_buf=8)


@pytest.mark.parametrize("probe", ["1", "mma", "wgmma", "wgmma_tma"])  # CUDA cores at M = 1; tensor cores at M = 16
def test_compiles_for_sm90(probe):
    assert_compiles(probe, bench_megakernel.SMEM_BYTES)


@pytest.mark.gpu
@requires_sm90
@pytest.mark.parametrize("m", [1, 2])
def test_matches_float32_reference(m):
    w = bench_megakernel._weights("cuda")
    x = torch.randn(m, bench_megakernel.H, device="cuda")
    ref = bench_megakernel._layers(w, x, torch.float32)
    fn = bench_megakernel._megakernel(w, x, MegakernelConfig(m=m), sync=True)
    for _ in range(2):  # a second launch must not see the first one's counters
        fn()
        torch.cuda.synchronize()
        assert rel_err(fn.h, ref) < 1e-5


@pytest.mark.gpu
@requires_sm90
@pytest.mark.parametrize("probe", ["mma", "wgmma", "wgmma_tma"])
@pytest.mark.parametrize(("m", "grid"), [(16, None), (5, 64)])
def test_mma_probe_matches_float32_reference(probe, m, grid):
    """The batch-16 tensor-core probe rounds only the GEMVs' inputs to bf16 (as the model's linears take
    them), so it must land at least as close to float32 as the layers run in bf16 do."""
    w = bench_megakernel._weights("cuda")
    x = torch.randn(m, bench_megakernel.H, device="cuda")
    ref = bench_megakernel._layers(w, x, torch.float32)
    bound = rel_err(bench_megakernel._layers(w, x, torch.bfloat16), ref)
    fn = getattr(bench_megakernel, f"_megakernel_{probe}")(w, x, grid)
    for _ in range(2):  # a second launch must not see the first one's counters
        fn()
        torch.cuda.synchronize()
        assert rel_err(fn.h, ref) <= bound, (rel_err(fn.h, ref), bound)


@pytest.mark.gpu
@requires_sm90
@pytest.mark.parametrize(("m", "grid"), [(16, None), (5, 64)])
def test_wgmma_tma_lm_head_logits_and_tokens(m, grid):
    """The TMA-staged probe with the lm_head: logits as close to float32 as the bf16 model's, and each row's
    token the first index of its own logits' maximum."""
    w, lm = bench_megakernel._weights("cuda"), bench_megakernel._lm_weights("cuda")
    x = torch.randn(m, bench_megakernel.H, device="cuda")
    ref = bench_megakernel._logits(lm, bench_megakernel._layers(w, x, torch.float32), torch.float32)
    bound = rel_err(bench_megakernel._logits(lm, bench_megakernel._layers(w, x, torch.bfloat16), torch.bfloat16), ref)
    fn = bench_megakernel._megakernel_wgmma_tma(w, x, grid, lm)
    for _ in range(2):  # a second launch must not see the first one's counters
        fn()
        torch.cuda.synchronize()
        assert rel_err(fn.logits, ref) <= bound, (rel_err(fn.logits, ref), bound)
        assert torch.equal(fn.tokens, fn.logits.argmax(-1))
