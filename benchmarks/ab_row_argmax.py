"""Greedy tokens by the sampler's torch reductions after the step (before) vs the one-launch row argmax
inside the step's CUDA graph (ascend_kernels/row_argmax.py, the engine's default on a GPU), in one process.

1. The argmax alone, 1 and 16 rows of Llama-3's 128,256 logits (bf16), 20 calls in one CUDA graph:
   torch.argmax, the sampler's chunked form (sampler.argmax_rows) and row_argmax.
2. Two engines on the same Llama-3.2-1B-shaped model (random weights, bf16): "before" is built with the
   runner's device argmax switched off (its graphs hold no argmax; the sampler computes it), "after" as
   shipped. Generates of prompt 128 / 128 new at batch 16 and 1, alternating, 4 rounds of 3; the tokens
   of both must be equal.

    python -m benchmarks.ab_row_argmax      (a GPU; about 3 minutes)
"""
from __future__ import annotations

import contextlib

import torch

from benchmarks.common import card_name, cli
from benchmarks.engine_ab import llama_1b_ab


@contextlib.contextmanager
def _sampler_argmax(on: bool):
    """With `on`, the runner leaves every argmax to the sampler (what the engine did before)."""
    from xy_inductor.engine import model_runner

    real = model_runner.ModelRunner._argmax_of
    if on:
        model_runner.ModelRunner._argmax_of = lambda self, logits: None
    try:
        yield
    finally:
        model_runner.ModelRunner._argmax_of = real


def _kernel_us() -> dict:
    from triton.testing import do_bench

    from ascend_kernels.row_argmax import RowArgmax
    from xy_inductor.engine.sampler import argmax_rows

    out = {}
    for rows in (1, 16):
        x = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
        ra = RowArgmax(16, 128256, x.device)
        if not (torch.equal(ra(x), x.argmax(-1)) and torch.equal(argmax_rows(x), x.argmax(-1))):
            raise RuntimeError("an argmax disagrees with torch.argmax")
        for name, fn in (("torch_argmax", lambda: x.argmax(-1)), ("sampler_chunked", lambda: argmax_rows(x)),
                         ("row_argmax", lambda: ra(x))):
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    fn()
            out[f"rows{rows}/{name}_us_in_graph"] = do_bench(graph.replay, warmup=20, rep=200,
                                                             return_mode="median") * 1e3 / 20
    return out


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "needs a GPU"}
    res = {"card": card_name(), **_kernel_us()}
    variants = {"before": lambda: _sampler_argmax(True), "after": lambda: _sampler_argmax(False)}
    res.update(llama_1b_ab(variants, quick))
    return res


def table(res: dict) -> str:
    if "card" not in res:
        return str(res)
    lines = [f"{res['card']}: greedy argmax by the sampler (before) or inside the step's graph (after)",
             "| batch | before tok/s | after tok/s | after / before | tokens equal |", "| --- | --- | --- | --- | --- |"]
    for b in (16, 1):
        before, after = res[f"before/bs{b}"]["tok_s"], res[f"after/bs{b}"]["tok_s"]
        lines.append(f"| {b} | {before:,.0f} | {after:,.0f} | {after / before:.3f} | {res[f'tokens_equal_bs{b}']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
