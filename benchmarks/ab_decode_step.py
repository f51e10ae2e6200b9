"""The batch-1 decode kernel of the working tree against the same kernel at another git revision, in one
process on the same buffers: step times at the positions and grids that matter, and both against the
float32 oracle. Separate processes (or device calls) differ by 1-2%, more than most kernel changes
gain (benchmarks/RESULTS.md, session 14), so a change is judged by this A/B.

The revision's kernel files (ascend_kernels/decode_step*.py and the modules they share) are written to
a temporary package with their imports pointed at each other, and its `DecodeStepKernel` runs on the
same weights and KV cache as the working tree's.

    python -m benchmarks.ab_decode_step [--rev main] [--rev DIR ...] [--quick]     (sm_90; a few minutes)

--rev takes a git revision or a folder holding the kernel's module files (a variant kept out of git, or a
machine whose copy of the repository has no history); repeat it to time several against the tree at once.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
# the kernel's modules: their `from ascend_kernels.<name> import` lines are repointed to the copy
MODULES = ("decode_step", "decode_step_kernel", "decode_step_attention", "decode_step_stream", "decode_step_layout",
           "grid_sync")


def _module_sources(rev: str) -> tuple[str, dict[str, str]]:
    """(a package name, {module: source}) of the kernel's modules in folder `rev` or at git revision `rev`."""
    folder = Path(rev)
    if folder.is_dir():
        found = {name: (folder / f"{name}.py").read_text() for name in MODULES if (folder / f"{name}.py").exists()}
        return "xy_dir_" + re.sub(r"\W", "_", folder.resolve().name), found
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    found = {}
    for name in MODULES:
        show = subprocess.run(["git", "show", f"{sha}:ascend_kernels/{name}.py"], cwd=ROOT, capture_output=True,
                              text=True, check=False)
        if show.returncode == 0:
            found[name] = show.stdout
    return f"xy_rev_{sha}", found


def load_revision(rev: str):
    """ascend_kernels.decode_step as of git revision (or in folder) `rev`, importable next to the working
    tree's."""
    pkg, sources = _module_sources(rev)
    root = Path(tempfile.mkdtemp(prefix="xyserve_ab_"))
    (root / pkg).mkdir()
    (root / pkg / "__init__.py").write_text("")
    present = list(sources)
    for name, text in sources.items():
        (root / pkg / f"{name}.py").write_text(text)
    if "decode_step" not in present:
        raise ValueError(f"revision {rev} has no ascend_kernels/decode_step.py")
    pattern = re.compile(r"\bascend_kernels\.(" + "|".join(present) + r")\b")
    for name in present:
        path = root / pkg / f"{name}.py"
        path.write_text(pattern.sub(lambda m: f"{pkg}.{m.group(1)}", path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module(f"{pkg}.decode_step")


def step_inputs(num_blocks: int = 128, block_size: int = 16):
    """Llama-3.2-1B shapes with random weights, stacked for the decode kernel, and a random paged KV cache
    with a shuffled block table: (weights, k_cache, v_cache, block_table)."""
    from transformers import LlamaForCausalLM

    from benchmarks.common import llama_config
    from xy_inductor.engine.decode_kernel import stack_weights

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to("cuda", torch.bfloat16).eval()
    w = stack_weights(model)
    d = w.dims
    k = torch.randn(d["NL"], num_blocks, block_size, d["NKV"], w.head_dim, device="cuda", dtype=torch.bfloat16) * 0.5
    return w, k, torch.randn_like(k), torch.randperm(num_blocks, device="cuda").int()


def run(revs: list[str], quick: bool) -> dict:
    from ascend_kernels import decode_step, reference
    from benchmarks.bench_megakernel import _graph_us
    from benchmarks.common import card_name

    mods = {"tree": decode_step, **{rev: load_revision(rev) for rev in revs}}
    w, k, v, bt = step_inputs()
    kernels = {name: mod.DecodeStepKernel(w, k, v, 16) for name, mod in mods.items()}
    token = torch.tensor([17], device="cuda", dtype=torch.int64)
    res = {"card": card_name(), "rev": revs, "tuned": {n: kern.grid for n, kern in kernels.items()}, "us": {}, "err": {}}
    for p in (192,) if quick else (192, 900, 1900):
        pos = torch.tensor([p], device="cuda", dtype=torch.int32)
        ref = reference.decode_step(w, k.clone(), v.clone(), bt, p, 17)
        for name, kern in kernels.items():  # every grid a revision takes computes the same step
            for g in mods[name].grid_candidates(w, kern.num_sms):
                kern._run(token, pos, bt, k, v, token, 0, g)
                torch.cuda.synchronize()
                err = ((kern.logits - ref).abs().max() / ref.abs().max()).item()
                res["err"][f"{name} pos {p} grid {g}"] = err
        for _ in range(2):  # interleaved rounds
            for name, kern in kernels.items():  # each kernel on the grids its own revision takes
                for g in mods[name].grid_candidates(w, kern.num_sms):
                    us = _graph_us(lambda kern=kern, g=g, pos=pos: kern._run(token, pos, bt, k, v, token, 0, g))
                    res["us"].setdefault(f"{name} pos {p} grid {g}", []).append(us)
    return res


def table(res: dict) -> str:
    lines = [f"{res['card']}: working tree vs {res['rev']} (tuned grids {res['tuned']}), us a step (min of 2 rounds)",
             "| case | us |", "| --- | --- |"]
    lines += [f"| {case} | {min(times):.1f} |" for case, times in res["us"].items()]
    lines.append("errors vs the float32 oracle: " + ", ".join(f"{c} {e:.1e}" for c, e in res["err"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", action="append", help="a git revision or a folder of module files (repeatable)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = run(args.rev or ["main"], args.quick)
    print(json.dumps(out, indent=1))
    print(table(out))
