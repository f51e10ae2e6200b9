"""Compile a decode megakernel probe for sm_90 without a GPU; print what the PTX holds as JSON.
Run in a fresh process from the repository root: `python -m tests.kernels.compile_megakernel_sm90 ARG`,
ARG = 1 or 2 (benchmarks/decode_megakernel.py at M = ARG), `mma` (benchmarks/decode_megakernel_mma.py),
`step` (ascend_kernels/decode_step_kernel.py), `step_timeline` / `step_timeline_tiles` (its stamped copy,
benchmarks/decode_step_timeline.py, without / with the per-tile stamps) or `rows`
(ascend_kernels/decode_rows_kernel.py).
"""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from ascend_kernels import decode_step
from ascend_kernels.decode_rows_kernel import decode_rows_kernel
from ascend_kernels.decode_rows_wgmma_kernel import decode_rows_wgmma_kernel
from ascend_kernels.decode_step_kernel import decode_step_kernel
from benchmarks.bench_megakernel import MegakernelConfig
from benchmarks.decode_megakernel import decode_megakernel_kernel
from benchmarks.decode_megakernel_mma import decode_megakernel_mma_kernel
from benchmarks.decode_megakernel_wgmma import decode_megakernel_wgmma_kernel
from benchmarks.decode_megakernel_wgmma_tma import decode_megakernel_wgmma_tma_kernel

_TYPES = {"n1_ptr": "*bf16", "n2_ptr": "*bf16", "nf_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
          "embed_ptr": "*bf16", "cnt_ptr": "*i32", "bt_ptr": "*i32", "pos_ptr": "*i32", "best_idx_ptr": "*i32",
          "token_ptr": "*i64", "tokens_out_ptr": "*i64", "eps": "fp32", "rope_scale": "fp32", "qk_scale": "fp32",
          "ids_ptr": "*i64", "slot_ptr": "*i64"}


def _compile(kernel, const: dict, box: tuple[int, int], num_warps: int, swizzle: int = 0,
             types: dict | None = None, boxes: dict | None = None) -> dict:
    layout = gl.NVMMASharedLayout(swizzle, 16, rank=2)
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for name in params:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            b = (boxes or {}).get(name, box)
            sig[name] = f"tensordesc<bf16[{b[0]},{b[1]}],{layout!r}>"
        else:
            sig[name] = {**_TYPES, **(types or {})}.get(name, "*fp32" if name.endswith("_ptr") else "i32")
    src = GluonASTSource(kernel, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                         attrs={(params.index(k),): [["tt.divisibility", 16]] for k in params if k.endswith("_ptr")})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    return {"tma": "cp.async.bulk.tensor" in ptx, "acquire": "acquire" in ptx, "release": "release" in ptx,
            "shared": compiled.metadata.shared, "triton": triton.__version__}


def main(arg: str) -> dict:
    if arg in ("step", "step_timeline", "step_timeline_tiles"):  # the kernel, or its copy with timeline stamps
        b = decode_step
        const = {"NL": 16, "H": 2048, "I": 8192, "V": 128256, "NQH": 32, "NKV": 8, "D": 64, "BS": 16,
                 "NSPLIT": b.NSPLIT, "T": b.TILE, "BN": b.BN, "BOX": b.BOX, "NB": b.NB, "NBUF": b.NBUF, "PICK": 2}
        if arg == "step":
            return _compile(decode_step_kernel, const, (b.BN, b.BOX), b.NB)
        from benchmarks.decode_step_timeline import stamped_module
        return _compile(stamped_module(arg == "step_timeline_tiles").decode_step_kernel, const, (b.BN, b.BOX), b.NB, types={"ts_ptr": "*i64"})
    if arg in ("rows_wgmma", "rows_wgmma_loop"):  # the swap-AB wgmma multi-row decode kernel (a burst's launch)
        const = {"NL": 16, "H": 2048, "I": 8192, "V": 128256, "NQH": 32, "NKV": 8, "D": 64, "BS": 16,
                 "TILE": 64, "MB": 16, "NBUF": 4, "LOOP": int(arg == "rows_wgmma_loop")}
        return _compile(decode_rows_wgmma_kernel, const, (64, 64), 4, swizzle=128,
                        types={"hb_ptr": "*bf16", "qkv_ptr": "*bf16", "attn_ptr": "*bf16", "g_ptr": "*bf16",
                               "pos_ptr": "*i64", "slot_ptr": "*i64"},
                        boxes={name: (16, 64) for name in ("xa_desc", "xh_desc", "xg_desc")})
    if arg == "rows":  # the multi-row decode kernel (ascend_kernels/decode_rows_kernel.py)
        const = {"NL": 16, "H": 2048, "I": 8192, "V": 128256, "NQH": 32, "NKV": 8, "D": 64, "BS": 16,
                 "TILE": 64, "MB": 16, "BN": 8, "NB": 8, "NBUF": 4, "MAXT": 4}
        return _compile(decode_rows_kernel, const, (8, 64), 8, swizzle=128,
                        types={"attn_ptr": "*bf16", "g_ptr": "*bf16", "pos_ptr": "*i64"})
    if arg == "wgmma":  # the second batch-16 probe: swap-AB wgmma, 128-byte swizzled boxes of [64, 64]
        const = {"NL": 16, "H": 2048, "I": 8192, "NQ": 3072, "MB": 16, "NBUF": 4, "SYNC": 1, "DEFER": 0, "BALANCE": 1}
        return _compile(decode_megakernel_wgmma_kernel, const, (64, 64), 4, swizzle=128)
    if arg == "wgmma_tma":  # the same with its activations staged by TMA, and the lm_head
        const = {"NL": 16, "H": 2048, "I": 8192, "NQ": 3072, "MB": 16, "NBUF": 4, "BALANCE": 1, "V": 128256}
        return _compile(decode_megakernel_wgmma_tma_kernel, const, (64, 64), 4, swizzle=128,
                        types={"hb_ptr": "*bf16", "q_ptr": "*bf16", "g_ptr": "*bf16", "tokens_ptr": "*i64"},
                        boxes={name: (16, 64) for name in ("xq_desc", "xh_desc", "xg_desc")})
    if arg == "mma":  # the batch-16 probe: tensor cores, 128-byte swizzled boxes of [8, 64]
        const = {"NL": 16, "H": 2048, "I": 8192, "NQ": 3072, "MB": 16, "BN": 8, "NB": 8, "NBUF": 4, "MAXT": 4}
        return _compile(decode_megakernel_mma_kernel, const, (8, 64), 8, swizzle=128)
    cfg = MegakernelConfig(m=int(arg))
    const = {"M": cfg.m, "NL": 16, "H": 2048, "I": 8192, "NQ": 3072, "BN": cfg.bn, "BOX": cfg.box,
             "NB": cfg.num_boxes, "NBUF": cfg.num_buf, "SYNC": 1}
    return _compile(decode_megakernel_kernel, const, (cfg.bn, cfg.box), cfg.num_boxes)


def compile_in_fresh_process(arg: str) -> dict:
    """The JSON report of `main(arg)` run in a fresh process without TRITON_INTERPRET (under the CPU
    interpreter Gluon does not compile); asserts the process succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.kernels.compile_megakernel_sm90", arg], env=env,
                         capture_output=True, text=True, timeout=600, check=False, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_compiles(arg: str, smem_bytes: int) -> None:
    """`main(arg)` compiles in a fresh process, with TMA copies and the grid counters' acquire loads and
    release reductions in its PTX, within smem_bytes of shared memory."""
    report = compile_in_fresh_process(arg)
    assert report["tma"] and report["acquire"] and report["release"], report
    assert report["shared"] <= smem_bytes, report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
