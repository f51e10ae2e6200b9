"""Compile the Gluon swap-AB GEMM for sm_90 without a GPU; print what the PTX holds as JSON.

Run by tests/kernels/test_gemm.py in a fresh process, from the repository root:
`python -m tests.kernels.compile_swap_sm90 BLOCK_M WARPS CB NBUF SPLIT_K HAS_BIAS`.
"""
import inspect
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from ascend_kernels.gemm_swap_hopper import swap_gemm_hopper_kernel


def main(block_m: int, warps: int, cb: int, nbuf: int, split_k: int, bias: int) -> dict:
    const = dict(HAS_BIAS=bool(bias), M_FROM_DEVICE=True, BLOCK_M=block_m, BLOCK_N=16 * warps, CB=cb, NBUF=nbuf,
                 SPLIT_K=split_k, NUM_WARPS=warps)
    params = list(inspect.signature(swap_gemm_hopper_kernel.fn).parameters)
    sig = {}
    for name in params:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"partials_ptr": "*fp32", "counters_ptr": "*i32", "num_tokens_ptr": "*i32"}.get(name, "*bf16")
        else:
            sig[name] = "i32"
    aligned = [k for k in params if k.endswith("_ptr") or k in ("N", "K", "stride_xm", "stride_wn", "stride_om")]
    src = GluonASTSource(swap_gemm_hopper_kernel, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                         attrs={(params.index(k),): [["tt.divisibility", 16]] for k in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    return {"wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
            "tma": "cp.async.bulk.tensor" in ptx, "shared": compiled.metadata.shared, "triton": triton.__version__}


if __name__ == "__main__":
    print(json.dumps(main(*(int(v) for v in sys.argv[1:7]))))
