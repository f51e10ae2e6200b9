"""Registers and spills of the meta-attention kernel for Hopper, read on a machine without a GPU.

    python -m benchmarks.kernel_registers                         # compute variant, paged prefill, 16-token pages
    python -m benchmarks.kernel_registers --warps 4 --stages 2    # another compile
    python -m benchmarks.kernel_registers --set PAGED=False KV_CHUNK=0 SMALL_KV_CHUNK=0 CHUNK_PAGES=1

The kernel is compiled for sm_90 by the importable Triton and assembled by the ptxas in its wheel.
- **Match the GPU's Triton.** The device image has 3.6. Locally: `pip install --target DIR triton==3.6.0`, then
  `PYTHONPATH=DIR`.
- **Divisibility hints.** Every pointer and stride gets the 16-byte hint that a real launch specialises on. Without
  the hints the loads are not vectorised and the counts mean nothing.
- **Trust.** In the eighth session these counts matched the device's `n_regs` / `n_spills`.
- **Per-loop report.** Each loop (a backward branch in the SASS) lists its instruction count, MMA instructions and
  spill instructions, so a spill in the KV loop is told apart from one in the prologue.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ascend_kernels import attention, profiles
from ascend_kernels.attention_kernel import meta_attention_kernel

_INT_POINTERS = {"table_ptr", "bt_ptr", "cu_ptr", "seq_ptr", "count_ptr"}
_FP32_POINTERS = {"part_ptr", "ml_ptr"}


def default_constexprs(head_dim: int = 128, page: int = 16, group: int = 4, num_heads: int = 32) -> dict:
    """What `attention.launch` compiles for a paged bf16 batch on an H100/H200 in the compute
    variant (prefill, mixed): its own constexpr builder on shape-only (meta) tensors."""
    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    q = meta(1, num_heads, head_dim)
    cache = meta(1, page, num_heads // group, head_dim)
    ops = attention.Operands(block_table=meta(1, 1, dtype=torch.int32), cu_seqlens_q=meta(2, dtype=torch.int32),
                             tree=meta(0, dtype=torch.uint8), mask=meta(0), mask_kind=0, paged=True, causal=True,
                             num_requests=1)
    tiles = attention.fit_small_tile(profiles.H100.attention_tiles(head_dim), head_dim, 2)
    return attention.kernel_constexprs(q, cache, cache, ops, tiles)


def _arg_type(name: str) -> str:
    if not name.endswith("_ptr"):
        return "fp32" if name == "scale_log2" else "i32"
    if name in _INT_POINTERS:
        return "*i32"
    if name in _FP32_POINTERS:
        return "*fp32"
    return "*u8" if name == "tree_ptr" else "*bf16"


def compile_ptx(constexprs: dict, num_warps: int, num_stages: int) -> tuple[str, int]:
    """(PTX, shared memory bytes) of the kernel for sm_90 with the given constexprs."""
    if profiles.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    params = list(inspect.signature(meta_attention_kernel.fn).parameters)
    unknown = set(constexprs) - set(params)
    if unknown:
        raise ValueError(f"not parameters of meta_attention_kernel: {sorted(unknown)}")
    signature = {p: "constexpr" if p in constexprs else _arg_type(p) for p in params}
    hinted = [p for p in params if p not in constexprs and (p.endswith("_ptr") or p.startswith("stride_"))]
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in hinted}
    src = ASTSource(meta_attention_kernel, signature, attrs=attrs,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel.asm["ptx"], kernel.metadata.shared


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def assemble(ptx: str, workdir: str) -> tuple[str, str]:
    """(ptxas -v output, cubin path). The wheel's ptxas may be older than the PTX Triton writes;
    its Blackwell ptxas (newer) then assembles sm_90a as well."""
    src = os.path.join(workdir, "kernel.ptx")
    cubin = os.path.join(workdir, "kernel.cubin")
    with open(src, "w") as f:
        f.write(ptx)
    for name in ("ptxas", "ptxas-blackwell"):
        if not os.path.exists(_tool(name)):
            continue
        run = subprocess.run([_tool(name), "-v", "--gpu-name", "sm_90a", src, "-o", cubin],
                             capture_output=True, text=True)
        if run.returncode == 0:
            return run.stdout + run.stderr, cubin
    raise RuntimeError("no ptxas in this Triton wheel assembled the PTX for sm_90a")


def loops(sass: str) -> list[dict]:
    """Every backward branch of the SASS as a loop: its length, MMA and spill instructions."""
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    found = []
    for addr, text in code:
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            body = [t for a, t in code if int(target.group(1), 16) <= a <= addr]
            found.append({"start": hex(int(target.group(1), 16)), "end": hex(addr), "instructions": len(body),
                          "mma": sum("GMMA" in t or "HMMA" in t for t in body),
                          "spill_ops": sum(bool(re.match(r"(@!?P\d+\s+)?(LDL|STL)", t)) for t in body)})
    return found


def report(constexprs: dict, num_warps: int, num_stages: int) -> dict:
    ptx, shared = compile_ptx(constexprs, num_warps, num_stages)
    with tempfile.TemporaryDirectory() as tmp:
        log, cubin = assemble(ptx, tmp)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"triton": triton.__version__, "num_warps": num_warps, "num_stages": num_stages, "shared_bytes": shared,
            "registers": int(regs[-1]), "spill_store_bytes": int(spills[-1][0]) if spills else 0,
            "spill_load_bytes": int(spills[-1][1]) if spills else 0, "loops": loops(sass)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warps", type=int, default=profiles.H100.num_warps)
    p.add_argument("--stages", type=int, default=profiles.H100.num_stages)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override constexprs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    constexprs = default_constexprs(args.head_dim, args.page)
    for item in args.set:
        name, _, value = item.partition("=")
        constexprs[name] = ast.literal_eval(value)
    res = report(constexprs, args.warps, args.stages)
    if args.json:
        print(json.dumps(res))
        return res
    print(f"triton {res['triton']}, {args.warps} warps, {args.stages} stages: {res['registers']} registers, "
          f"spills {res['spill_store_bytes']} B stored / {res['spill_load_bytes']} B loaded, "
          f"{res['shared_bytes']} B shared")
    for loop in res["loops"]:
        print(f"  loop {loop['start']}-{loop['end']}: {loop['instructions']} instructions, "
              f"{loop['mma']} MMA, {loop['spill_ops']} spill")
    return res


if __name__ == "__main__":
    main()
