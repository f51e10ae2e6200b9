"""Register layouts shared by the persistent decode kernels (decode_step_kernel.py and the layers-only
probe in benchmarks/decode_megakernel.py).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def stage_layout(K: gl.constexpr, NB: gl.constexpr):
    """Offsets 0..K-1 as [K / 8, 8]: 8 contiguous values per thread, NB warps."""
    LS: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [NB, 1], [1, 0])
    rr = gl.arange(0, K // 8, layout=gl.SliceLayout(1, LS))
    ee = gl.arange(0, 8, layout=gl.SliceLayout(0, LS))
    return gl.expand_dims(rr, 1) * 8 + gl.expand_dims(ee, 0)


@gluon.jit
def tile_out(acc):
    """A row tile's outputs from the per-thread partial sums [NB, BN, 32]."""
    return gl.sum(gl.sum(acc, axis=2), axis=0)
