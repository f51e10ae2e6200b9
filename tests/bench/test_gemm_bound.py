"""The GEMM upper-bound probe: its read kernel reads every byte once, and its bound never
credits a point with more than the cuBLAS time over the larger of the two floors."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks import gemm_bound


@pytest.mark.parametrize("strided", [False, True], ids=["chunks", "strided"])
@pytest.mark.parametrize("numel, programs, block", [(1000, 3, 64), (4096, 4, 256), (777, 5, 128)])
def test_stream_read_sums_every_element_once(numel, programs, block, strided):
    src = torch.randn(numel, dtype=torch.float32).to(torch.bfloat16)
    out = torch.full((programs,), float("nan"), dtype=torch.float32)
    gemm_bound.stream_read(src, out, block, 4, strided)
    if strided:  # program p: blocks p, p + programs, ...
        blocks = src.float().split(block)
        want = [sum((b.sum() for b in blocks[p::programs]), torch.tensor(0.0)) for p in range(programs)]
    else:
        chunk = math.ceil(math.ceil(numel / programs) / block) * block
        want = [src[p * chunk : (p + 1) * chunk].float().sum() for p in range(programs)]
    torch.testing.assert_close(out, torch.stack(want), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.sum(), src.float().sum(), rtol=1e-5, atol=1e-3)


def test_stream_read_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="contiguous 1-D"):
        gemm_bound.stream_read(torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(2), 64, 4)
    with pytest.raises(ValueError, match="float32"):
        gemm_bound.stream_read(torch.zeros(16, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16), 64, 4)


def test_summary_is_the_geomean_of_the_point_bounds():
    pts = [{"m": 1, "bound": 1.5, "roofline_bound": 2.0, "read_of_bw": 0.5},
           {"m": 100, "bound": 1.0, "roofline_bound": 1.0, "read_of_bw": 0.9},
           {"m": 4096, "bound": 1.0, "roofline_bound": 1.0, "read_of_bw": 0.95}]  # fmt: skip
    s = gemm_bound.summarize(pts)
    assert s["bound_geomean"] == pytest.approx(1.5 ** (1 / 3))
    assert s["roofline_bound_geomean"] == pytest.approx(2.0 ** (1 / 3))
    assert s["small_m_read_of_bw_min"] == 0.5 and s["M1-16_bound_geomean"] == pytest.approx(1.5)
