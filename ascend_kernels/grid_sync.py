"""Grid-wide stage counters of the persistent decode kernels: each program bumps a stage's counter
once after its stores (`red.release`), and a program that needs the stage's outputs polls it until
every program of the grid has (acquire loads).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ascend_kernels.gluon_compat import cta_barrier as _barrier


@gluon.jit
def wait_stage(cnt_ptr, idx, G):
    while gl.atomic_add(cnt_ptr + idx, 0, sem="acquire") < G:
        pass


@gluon.jit
def signal_stage(cnt_ptr, idx):
    """Bump a grid counter once for the CTA, after its stores: a fire-and-forget `red.release` (an
    atomic's returned value would cost the signalling program another round trip to L2)."""
    _barrier()  # every warp's stores are issued
    gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p red.release.gpu.global.add.u32 [$1], 1; mov.u32 $0, 0; }",
        "=r,l", [cnt_ptr + idx], dtype=gl.int32, is_pure=False, pack=1)
