"""Compile the decode megakernel probe (benchmarks/decode_megakernel.py) for sm_90 without a GPU; print
what the PTX holds as JSON. Run in a fresh process from the repository root:
`python -m tests.kernels.compile_megakernel_sm90 M`.
"""
import inspect
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from benchmarks.bench_megakernel import MegakernelConfig
from benchmarks.decode_megakernel import decode_megakernel_kernel


def main(m: int) -> dict:
    cfg = MegakernelConfig(m=m)
    layout = gl.NVMMASharedLayout(0, 16, rank=2)
    const = {"M": m, "NL": 16, "H": 2048, "I": 8192, "NQ": 3072, "BN": cfg.bn, "BOX": cfg.box, "NB": cfg.num_boxes,
             "NBUF": cfg.num_buf, "SYNC": 1}
    params = list(inspect.signature(decode_megakernel_kernel.fn).parameters)
    sig = {}
    for name in params:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            sig[name] = f"tensordesc<bf16[{cfg.bn},{cfg.box}],{layout!r}>"
        else:
            sig[name] = {"n1_ptr": "*bf16", "n2_ptr": "*bf16", "cnt_ptr": "*i32", "eps": "fp32"}.get(
                name, "*fp32" if name.endswith("_ptr") else "i32")
    src = GluonASTSource(decode_megakernel_kernel, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                         attrs={(params.index(k),): [["tt.divisibility", 16]] for k in params if k.endswith("_ptr")})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_boxes})
    ptx = compiled.asm["ptx"]
    return {"tma": "cp.async.bulk.tensor" in ptx, "acquire": "acquire" in ptx, "release": "release" in ptx,
            "shared": compiled.metadata.shared, "triton": triton.__version__}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
