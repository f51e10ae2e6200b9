"""Compile SmoothGEMM's Gluon kernels for sm_90 without a GPU; print what the PTX holds as JSON.

Run by tests/kernels/test_gemm.py in a fresh process, from the repository root:
`python -m tests.kernels.compile_gemm_gluon swap BLOCK_M WARPS CB NBUF SPLIT_K HAS_BIAS` (gemm_swap_hopper.py)
or `python -m tests.kernels.compile_gemm_gluon rows4 BLOCK_N WARPS HAS_BIAS` (gemv_rows_fma.py).
"""
import inspect
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from ascend_kernels.gemm_swap_hopper import swap_gemm_hopper_kernel
from ascend_kernels.gemv_rows_fma import gemv_rows_fma_kernel


def _compile(kernel, const: dict, warps: int):
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for name in params:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"partials_ptr": "*fp32", "counters_ptr": "*i32", "num_tokens_ptr": "*i32"}.get(name, "*bf16")
        else:
            sig[name] = "i32"
    aligned = [k for k in params if k.endswith("_ptr") or k in ("N", "K", "stride_xm", "stride_wn", "stride_om")]
    src = GluonASTSource(kernel, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                         attrs={(params.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def main(kind: str, *args: int) -> dict:
    if kind == "swap":
        block_m, warps, cb, nbuf, split_k, bias = args
        const = dict(HAS_BIAS=bool(bias), M_FROM_DEVICE=True, BLOCK_M=block_m, BLOCK_N=16 * warps, CB=cb,
                     NBUF=nbuf, SPLIT_K=split_k, NUM_WARPS=warps)
        compiled = _compile(swap_gemm_hopper_kernel, const, warps)
    else:
        block_n, warps, bias = args
        const = dict(HAS_BIAS=bool(bias), M_FROM_DEVICE=True, BLOCK_M=4, BLOCK_N=block_n, WARPS=warps)
        compiled = _compile(gemv_rows_fma_kernel, const, warps)
    ptx = compiled.asm["ptx"]
    return {"wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
            "tma": "cp.async.bulk.tensor" in ptx, "fma": len(re.findall(r"fma\.rn\.f32", ptx)),
            "ld_v4": len(re.findall(r"ld\.global[^\n]*\.v4", ptx)), "local": len(re.findall(r"(ld|st)\.local", ptx)),
            "shared": compiled.metadata.shared, "triton": triton.__version__}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(v) for v in sys.argv[2:]))))
