"""Gluon names that moved between the Triton releases we run on (3.6 on the GPU image, 3.9 on the
CPU side), resolved once at import so kernels compile with either.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

# TMA global -> shared copy: 3.6 async_copy_global_to_shared, 3.9 async_load
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# CTA-wide barrier: 3.6 thread_barrier, 3.9 barrier
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))


@gluon.jit
def smem_view(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    """The same shared memory under another shape (3.6 _reinterpret, 3.9 reinterpret); both layouts
    must be plain row-major for the view to mean anything."""
    if _NEW_REINTERPRET:
        return smem.reinterpret(dtype, shape, layout)
    else:
        return smem._reinterpret(dtype, shape, layout)
