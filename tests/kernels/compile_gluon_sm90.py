"""Compile the Hopper prefill kernel for sm_90 without a GPU; print what the PTX holds as JSON.

Run by tests/kernels/test_prefill_hopper.py in a fresh process, from the repository root:
`python -m tests.kernels.compile_gluon_sm90 HEAD_DIM PAGE DTYPE`.
"""
import inspect
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from ascend_kernels.prefill_hopper import HopperPrefillConfig
from ascend_kernels.prefill_hopper_kernel import prefill_hopper_kernel


def main(head_dim: int, page: int, dtype: str) -> dict:
    cfg = HopperPrefillConfig()
    elem = gl.bfloat16 if dtype == "bf16" else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_m, head_dim // 2], elem)
    kv_layout = gl.NVMMASharedLayout.get_default_for([page, head_dim // 2], elem)
    const = dict(NUM_HEADS=8, GROUP=4, D=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE=page,
                 NUM_BUF=cfg.num_buf, QBUF=cfg.q_buf, COMPUTE_REGS=cfg.compute_regs, LOADER_REGS=cfg.loader_regs)
    params = list(inspect.signature(prefill_hopper_kernel.fn).parameters)
    sig = {}
    for name in params:
        if name in const:
            sig[name] = "constexpr"
        elif name == "q_desc":
            sig[name] = f"tensordesc<{dtype}[{cfg.block_m},{head_dim // 2}],{q_layout!r}>"
        elif name.endswith("_desc"):
            sig[name] = f"tensordesc<{dtype}[{page},{head_dim // 2}],{kv_layout!r}>"
        else:
            sig[name] = {"o_ptr": f"*{dtype}", "qk_scale": "fp32"}.get(name, "*i32" if name.endswith("_ptr") else "i32")
    src = GluonASTSource(prefill_hopper_kernel, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                         attrs={(params.index(k),): [["tt.divisibility", 16]] for k in params if k.endswith("_ptr")})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": cfg.maxnreg})
    ptx = compiled.asm["ptx"]
    return {"tma": "cp.async.bulk.tensor" in ptx, "wgmma": "wgmma.mma_async" in ptx, "setmaxnreg": "setmaxnreg" in ptx,
            "shared": compiled.metadata.shared, "triton": triton.__version__}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
