"""Decode batches without the task walk (the Task-Table's decode_requests header) against the same
kernel walking the same tasks (the header field zeroed: what every batch did before), in one process.

1. The kernel alone, Llama-3.2-1B heads (32 / 8, head dim 64, bf16, block 16), 16 layers of
   distinct caches in one CUDA graph (us a layer): 16 decodes at 129-256 positions, 1 at 192, 32
   at 129-256, 16 at 1,000, 32 at 2,000 (kept whole: see tiling._keep_whole) and 1 at 4,000
   (split along KV, so it walks either way). Outputs must agree.
2. Two engines on the same Llama-3.2-1B-shaped model (random weights, bf16), "walk" with the
   field zeroed in every step's table, "decode" as shipped. Generates of prompt 128 / 128 new at
   batch 16 and 1, alternating, 4 rounds of 3; the tokens must be equal.

    python -m benchmarks.ab_decode_batch      (a GPU; about 4 minutes)
"""
from __future__ import annotations

import contextlib

import torch

from benchmarks.common import card_name, cli
from benchmarks.engine_ab import llama_1b_ab

HEADS, KV_HEADS, DIM, PAGE, LAYERS = 32, 8, 64, 16, 16


def _layers(kv_lens: list[int], device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    blocks = [-(-kv // PAGE) for kv in kv_lens]
    table = torch.zeros(len(kv_lens), max(blocks), dtype=torch.int32, device=device)
    perm = torch.randperm(sum(blocks), device=device, generator=g).to(torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n]
        used += n
    cu = torch.arange(len(kv_lens) + 1, dtype=torch.int32, device=device)
    seq = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    layers = [(torch.randn(len(kv_lens), HEADS, DIM, device=device, generator=g, dtype=torch.bfloat16),
               *(torch.randn(sum(blocks), PAGE, KV_HEADS, DIM, device=device, generator=g, dtype=torch.bfloat16)
                 for _ in range(2))) for _ in range(LAYERS)]
    return layers, cu, seq, table


def _tables(kv_lens: list[int], split_kv: bool, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(the planner's table, the same with the decode field zeroed, whether the planner marked it)."""
    from ascend_kernels.profiles import profile_for
    from ascend_kernels.tiling import F_DECODE_REQUESTS, plan

    profile = profile_for(torch.device(device)).for_batch(len(kv_lens), len(kv_lens))
    p = plan([1] * len(kv_lens), kv_lens, num_q_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, profile=profile,
             split_kv=split_kv)
    table = p.tensor()
    walk = table.clone()
    walk[F_DECODE_REQUESTS] = 0
    return table.to(device), walk.to(device), p.decode_requests > 0


def _graph_us(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=20, rep=300, return_mode="median") * 1e3 / LAYERS


def _kernel_us() -> dict:
    import lowering.ops  # noqa: F401

    attend = torch.ops.xyserve.paged_attention
    cases = {"decode16": (list(range(129, 257, 8)), True), "decode1": ([192], True),
             "decode32": (list(range(129, 257, 4)), True), "decode16_1k": ([1000] * 16, True),
             "decode32_2k": ([2000] * 32, True), "decode1_4k": ([4000], True)}
    out = {}
    for name, (kv_lens, split) in cases.items():
        layers, cu, seq, block_table = _layers(kv_lens)
        table, walk, marked = _tables(kv_lens, split)
        out[f"{name}/decode_marked"] = marked
        q, kc, vc = layers[0]
        a = attend(q, kc, vc, cu, seq, block_table, 0.125, None, table, "auto")
        b = attend(q, kc, vc, cu, seq, block_table, 0.125, None, walk, "auto")
        out[f"{name}/max_abs_diff"] = (a.float() - b.float()).abs().max().item()
        for label, t in (("walk", walk), ("decode", table)):
            out[f"{name}/{label}_us_per_layer"] = _graph_us(
                lambda t=t: [attend(q, kc, vc, cu, seq, block_table, 0.125, None, t, "auto") for q, kc, vc in layers])
    return out


@contextlib.contextmanager
def _walk_only(on: bool):
    """With `on`, every step's Task-Table has its decode field zeroed (the kernel walks tasks)."""
    from ascend_kernels.tiling import F_DECODE_REQUESTS
    from xy_inductor.engine.task_tables import TaskTables

    real = TaskTables._plan

    def plan(self, *args, **kwargs):
        p = real(self, *args, **kwargs)
        p.table[F_DECODE_REQUESTS] = 0
        return p

    if on:
        TaskTables._plan = plan
    try:
        yield
    finally:
        TaskTables._plan = real


def run(quick: bool = False, kernels_only: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "needs a GPU"}
    if kernels_only:
        return {"card": card_name(), **_kernel_us()}
    res = {"card": card_name(), **_kernel_us()}
    variants = {"walk": lambda: _walk_only(True), "decode": lambda: _walk_only(False)}
    res.update(llama_1b_ab(variants, quick))
    return res


def table(res: dict) -> str:
    if "card" not in res:
        return str(res)
    lines = [f"{res['card']}: decode batches walking their tasks (walk) or mapped to programs directly (decode)",
             "| case | planner marks it | walk us/layer | decode us/layer | max abs diff |", "| --- | --- | --- | --- | --- |"]
    for case in ("decode16", "decode1", "decode32", "decode16_1k", "decode32_2k", "decode1_4k"):
        lines.append(f"| {case} | {res[f'{case}/decode_marked']} | {res[f'{case}/walk_us_per_layer']:.2f} | "
                     f"{res[f'{case}/decode_us_per_layer']:.2f} | {res[f'{case}/max_abs_diff']:.1e} |")
    if "walk/bs16" not in res:
        return "\n".join(lines)
    lines += ["", "| batch | walk tok/s | decode tok/s | decode / walk | tokens equal |", "| --- | --- | --- | --- | --- |"]
    for b in (16, 1):
        walk, dec = res[f"walk/bs{b}"]["tok_s"], res[f"decode/bs{b}"]["tok_s"]
        lines.append(f"| {b} | {walk:,.0f} | {dec:,.0f} | {dec / walk:.3f} | {res[f'tokens_equal_bs{b}']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table, {"kernels_only": "time the kernels only (no engines)"})
