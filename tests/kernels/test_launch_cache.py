"""LaunchCache: its key pins what Triton specialises on, and the cached launcher gives the JIT's results."""
from __future__ import annotations

import pytest
import torch
import triton

from ascend_kernels import gemv_rows
from ascend_kernels.gemm import smooth_gemm
from ascend_kernels.gemm_table import GemmConfig
from ascend_kernels.launch_cache import LaunchCache


def _args(x, n=96, k=80, rows=None):
    # gemv_rows_kernel's runtime arguments: pointers, num_rows (do_not_specialize), N, K, strides
    return (x, x, x, x, x, x.shape[0] if rows is None else rows, n, k, k, 1, 1, k, n)


@triton.jit
def _pointer_after_an_int(a_ptr, n, b_ptr):
    pass


def test_kernels_must_take_their_pointers_first():
    with pytest.raises(ValueError, match="pointer first"):
        LaunchCache(_pointer_after_an_int)


def test_key_follows_triton_specialisation():
    cache = LaunchCache(gemv_rows.gemv_rows_kernel)
    buf = torch.zeros(2 * 96 * 80, dtype=torch.bfloat16)
    aligned, shifted = buf[: 96 * 80].view(96, 80), buf[1 : 96 * 80 + 1].view(96, 80)  # 2 bytes off 16
    opts = {"HAS_BIAS": False, "num_warps": 4}
    key = cache.key(_args(aligned), opts)
    assert key == cache.key(_args(aligned.clone()), opts)  # another tensor, same dtype and alignment
    assert key != cache.key(_args(shifted), opts)  # alignment is specialised on
    assert key != cache.key(_args(aligned.float()), opts)  # so is the dtype
    assert key != cache.key(_args(aligned, n=112), opts)  # specialised ints: exact value
    assert key != cache.key(_args(aligned), {**opts, "num_warps": 8})  # constexprs and options
    # num_rows is do_not_specialize: only its type (32 or 64 bits) counts, so no key per M
    assert key == cache.key(_args(aligned, rows=1), opts) == cache.key(_args(aligned, rows=333), opts)
    assert key != cache.key(_args(aligned, rows=2**31), opts)


@pytest.mark.gpu
def test_gpu_cached_launches_match_and_skip_the_binder():
    torch.manual_seed(0)
    cfg = GemmConfig(1, 2, 256, 1, 1, 4, 3)
    w = torch.randn(512, 1024, dtype=torch.bfloat16, device="cuda") / 32
    buf = torch.randn(4 * 1024 + 8, dtype=torch.bfloat16, device="cuda")
    for x in (buf[:1024].view(1, 1024), buf[1 : 1024 + 1].view(1, 1024)):  # aligned, then 2 bytes off
        ref = (x.double() @ w.double().T).float()
        for _ in range(3):  # the first call compiles through the JIT, the others use the cached launcher
            out = smooth_gemm(x, w, None, False, config=cfg)
            assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert len(gemv_rows._LAUNCH.compiled) >= 2


def test_only_hooks_that_do_something_force_the_normal_path():
    from triton import knobs

    from ascend_kernels.launch_cache import _hooked

    chain = type(knobs.runtime.launch_enter_hook)() if knobs.runtime.launch_enter_hook is not None else None
    assert not _hooked(None) and not _hooked(chain if chain is not None else None)
    if chain is not None:  # Triton 3.4+: an empty HookChain means no hook
        chain.add(print)
        assert _hooked(chain)
    assert _hooked(print)
