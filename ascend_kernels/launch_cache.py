"""Triton launches without Triton's per-call argument binding: the host cost of eager GEMM calls.

`kernel[grid](*args, **kw)` binds and specialises every argument in Python on each call: about
13 us on an H200 host for the 13 arguments of a SmoothGEMM kernel, against about 6 us for the
launch itself (benchmarks/RESULTS.md, twenty-third session). A decode step calls the same kernels
with the same few argument patterns over and over, so the compiled kernel is kept under a key
that pins everything Triton specialises an argument on, and later calls with that key go straight
to the compiled kernel's own launcher (`CompiledKernel.run`, what `kernel[grid]` ends in).

The key is stricter than Triton's own: a tensor gives its dtype and whether its address is
16-byte aligned (Triton's only tensor specialisation), an int its exact value, except the ints the
kernel declares `do_not_specialize`, which give only whether they fit in 32 bits (their type);
constexprs and launch options give their values, plus the current CUDA device. Two calls with equal
keys therefore select the same compiled kernel in Triton too. Anything else (CPU tensors under the
interpreter, a launch or pre-run hook, the first call of a key) takes the normal path.
"""
from __future__ import annotations

import inspect

import torch
import triton
from triton import knobs
from triton.runtime import driver

_INT32 = (-(2**31), 2**31 - 1)
_MAX_KEYS = 4096


def _hooked(hook) -> bool:
    """A launch hook that does something: Triton 3.4+ keeps an empty HookChain there, older ones None."""
    return hook is not None and bool(getattr(hook, "calls", True))


class LaunchCache:
    """kernel[grid](*args, **kwargs), where `args` are the kernel's runtime arguments in order and
    `kwargs` its constexprs (by name) plus launch options (num_warps, num_stages)."""

    def __init__(self, kernel: triton.runtime.JITFunction):
        self.kernel = kernel
        self.names = list(inspect.signature(kernel.fn).parameters)
        # a JITFunction keeps the list itself, the interpreter's stand-in in its kwargs
        dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
        unspecialised = [i for i, name in enumerate(self.names) if name in dns or i in dns]
        # The kernels here take their pointers first (`*_ptr`), then ints; the key reads them so.
        self.num_ptrs = next(i for i, name in enumerate(self.names) if not name.endswith("_ptr"))
        if any(name.endswith("_ptr") for name in self.names[self.num_ptrs :]) or any(
            i < self.num_ptrs for i in unspecialised
        ):
            raise ValueError(f"LaunchCache: {self.names} must list every pointer first and leave them specialised")
        self.unspecialised = [i - self.num_ptrs for i in unspecialised]
        self.compiled: dict = {}

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """What the call specialises on (without the device): each pointer's dtype and 16-byte
        alignment, the ints (an unspecialised one only as 32 or 64 bits), constexprs and options."""
        ptrs = [(a.dtype, a.data_ptr() & 15 == 0) for a in args[: self.num_ptrs]]
        ints = list(args[self.num_ptrs :])
        for i in self.unspecialised:
            ints[i] = _INT32[0] <= ints[i] <= _INT32[1]
        return tuple(ptrs), tuple(ints), tuple(kwargs.items())

    def __call__(self, grid: tuple, *args, **kwargs) -> None:
        hooked = _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook) or bool(
            self.kernel.pre_run_hooks)
        if hooked or not (isinstance(args[0], torch.Tensor) and args[0].is_cuda):
            self.kernel[grid](*args, **kwargs)
            return
        device = torch.cuda.current_device()
        key = (device, self.key(args, kwargs))
        compiled = self.compiled.get(key)
        if compiled is None:  # Triton's own path: compiles (or finds) the kernel for this key
            if len(self.compiled) >= _MAX_KEYS:  # strides of ever new views: keep the dict bounded
                self.compiled.clear()
            self.compiled[key] = self.kernel[grid](*args, **kwargs)
            return
        constexprs = [kwargs[name] for name in self.names[len(args):]]
        grid1, grid2 = grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        # CompiledKernel.run: the launcher Triton's own path ends in, with no launch metadata or
        # hooks (none are set, checked above), every parameter in order (constexprs included)
        compiled.run(grid[0], grid1, grid2, driver.active.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *constexprs)  # fmt: skip
