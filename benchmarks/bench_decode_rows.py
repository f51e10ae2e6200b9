"""The multi-row decode kernels (ascend_kernels/decode_rows.py, decode_rows_wgmma.py) against the engine's
batch-16 decode, in one process on one card. Llama-3.2-1B shapes, bf16, random weights (issue 6's
batch-16 target).

- `<kernel>_m<M>`: one decode step of M requests at positions around PROMPT + NEW / 2, a CUDA graph of
  it replayed (bench_megakernel's timing; the same step: its K/V writes repeat); tok/s = M / the time per step.
- `engine`: `LLM.generate` of 16 prompts of PROMPT tokens, NEW new tokens each (compiled model, CUDA
  graphs, async scheduling): tok/s of the whole generate and the decode rate past the prefill;
  `engine_rows_kernel` the same with `decode_megakernel_rows` (its decode steps on the wgmma kernel),
  with decode_burst=1 (one launch per engine step), `engine_rows_bursts` with the default decode_burst
  (bursts of rows: up to that many launches per engine step; tokens must equal engine_rows_kernel's).
- the floor: (weights + the step's K/V reads) / measured copy bandwidth, per step of 16.
Correctness: every row's logits of a 16-row step against the float32 oracle (ascend_kernels.reference)
run row by row, and its greedy token against its own logits' argmax.

    python -m benchmarks.bench_decode_rows [--quick]        (sm_90 only)
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from benchmarks.bench_megakernel import _graph_us
from benchmarks.common import (
    attempt,
    card_name,
    card_rates,
    cli,
    is_sm90,
    llama_config,
    rel_err,
    timed,
    weight_bytes,
)

PROMPT, NEW, BS, ROWS = 128, 128, 16, 16


def _step(w, num_rows: int, blocks_per_row: int = 24):
    """A paged cache with random K/V and the inputs of one decode step of num_rows requests (the same for
    every kernel: the slowest row's position sets the attention's time)."""
    torch.manual_seed(num_rows)
    nl, nkv, hd = w.dims["NL"], w.num_kv_heads, w.head_dim
    k = torch.randn(nl, num_rows * blocks_per_row, BS, nkv, hd, device="cuda", dtype=torch.bfloat16) * 0.5
    v = torch.randn_like(k)
    block_table = torch.randperm(num_rows * blocks_per_row, device="cuda").view(num_rows, -1).int()
    positions = torch.randint(PROMPT, PROMPT + NEW, (num_rows,), device="cuda")
    slots = block_table[torch.arange(num_rows), positions // BS].long() * BS + positions % BS
    ids = torch.randint(0, w.dims["V"], (num_rows,), device="cuda")
    return k, v, (ids, positions, block_table, slots, torch.zeros(ROWS, device="cuda", dtype=torch.int64))


def _check(w, kernel, k, v, args) -> dict:
    from ascend_kernels import reference

    ids, positions, block_table, _, tokens = args
    k_ref, v_ref = k.clone(), v.clone()
    logits = kernel.launch_rows(*args)
    torch.cuda.synchronize()
    errs, argmax_ok = [], 0
    for r in range(ids.shape[0]):
        ref = reference.decode_step(w, k_ref, v_ref, block_table[r], int(positions[r]), int(ids[r]))
        errs.append(rel_err(logits[r], ref))
        argmax_ok += int(tokens[r]) == int(logits[r].argmax())
    return {"max_rel_err": max(errs), "tokens_equal_own_argmax": argmax_ok, "rows": ids.shape[0]}


def _engine(model, quick: bool, **options) -> dict:
    from xy_inductor import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (ROWS, PROMPT), generator=g).tolist()
    llm = LLM(model, **options)
    full = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    outputs = llm.generate(prompts, full, use_tqdm=False)  # warm-up; its tokens are compared
    seconds, _ = timed(lambda: llm.generate(prompts, full, use_tqdm=False), 2 if quick else 3)
    prefill, _ = timed(lambda: llm.generate(prompts, one, use_tqdm=False), 2 if quick else 3)
    stats = {k: v for k, v in llm.engine.runner.stats.items() if k == "decode_megakernel_steps"}
    return {"tok_s": ROWS * NEW / seconds, "decode_tok_s": ROWS * (NEW - 1) / (seconds - prefill), **stats,
            "token_ids": [o.token_ids for o in outputs]}


def _agreement(a: list, b: list) -> dict:
    """How far two engines' greedy tokens agree: rows equal throughout, and each row's first difference
    (bf16 paths that round differently part at near-ties of random weights' flat logits)."""
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    return {"rows_equal": sum(f is None for f in first), "rows": len(first), "first_difference": first}


def _kernels() -> dict:
    """The multi-row kernels side by side: the mma_v2 one and the swap-AB wgmma one."""
    from ascend_kernels.decode_rows import DecodeRowsKernel
    from ascend_kernels.decode_rows_wgmma import DecodeRowsWgmmaKernel

    return {"mma_v2": DecodeRowsKernel, "wgmma": DecodeRowsWgmmaKernel}


def _kernel_rows(w, name: str, make, res: dict) -> dict:
    """One kernel's step times at 2, 8 and 16 rows, and its 16-row step checked (into res); printed as they
    come (a kernel that hangs still leaves the others' numbers)."""
    for m in (2, 8, 16):
        k, v, args = _step(w, m)
        kernel = make(w, k, v, BS)
        if m == ROWS:
            res["check"][name] = _check(w, kernel, k, v, args)
        us = _graph_us(lambda kernel=kernel, args=args: kernel.launch_rows(*args))
        res["rows"][f"{name}_m{m}"] = {"us_per_step": us, "tok_s": m / us * 1e6, "grid": kernel.grid}
        print(name, m, res["rows"][f"{name}_m{m}"], res["check"].get(name, ""), flush=True)
        del kernel, k, v
        torch.cuda.empty_cache()
    return {}


def run(quick: bool = False) -> dict:
    if not is_sm90():
        return {"skipped": "needs an sm_90 GPU"}
    from xy_inductor.engine.decode_kernel import stack_weights

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to(device="cuda", dtype=torch.bfloat16).eval()
    w = stack_weights(model)
    rates = card_rates()
    kv_bytes = ROWS * (PROMPT + NEW // 2) * w.dims["NL"] * w.num_kv_heads * w.head_dim * 2 * 2
    floor_step_s = (weight_bytes(model) + kv_bytes) / rates["copy_bytes_per_s"]
    res = {"card": card_name(), "floor_tok_s": ROWS / floor_step_s, "rows": {}, "check": {}}
    for name, make in _kernels().items():  # a kernel that fails is reported and the others still run
        attempt(res, f"error_{name}", lambda name=name, make=make: _kernel_rows(w, name, make, res))
    del w
    torch.cuda.empty_cache()
    res["rows"]["engine"] = _engine(model, quick)
    rows = dict(decode_megakernel=True, decode_megakernel_rows=True)  # the wgmma kernel in the engine
    attempt(res["rows"], "engine_rows_kernel", lambda: _engine(model, quick, decode_burst=1, **rows))
    attempt(res["rows"], "engine_rows_bursts", lambda: _engine(model, quick, **rows))
    tokens = {k: res["rows"][k].pop("token_ids", None) for k in ("engine", "engine_rows_kernel", "engine_rows_bursts")}
    if tokens["engine"] is not None and tokens["engine_rows_kernel"] is not None:
        res["engine_tokens"] = _agreement(tokens["engine"], tokens["engine_rows_kernel"])
    if tokens["engine_rows_kernel"] is not None and tokens["engine_rows_bursts"] is not None:
        res["burst_tokens"] = _agreement(tokens["engine_rows_kernel"], tokens["engine_rows_bursts"])  # equal
    for row in res["rows"].values():
        if "tok_s" in row:
            row["floor_pct"] = 100 * row.get("decode_tok_s", row["tok_s"]) / res["floor_tok_s"]
    print(res, flush=True)
    return res


def table(res: dict) -> str:
    if "rows" not in res:
        return str(res)
    lines = [f"{res['card']}: Llama-3.2-1B shapes, decode at {ROWS} requests, floor {res['floor_tok_s']:,.0f} tok/s",
             "| variant | tok/s | % of floor (decode) |", "| --- | --- | --- |"]
    for name, row in res["rows"].items():
        if "tok_s" not in row:
            lines.append(f"| {name} | {row.get('error', '?')} | |")
            continue
        dec = f" (decode past the prefill {row['decode_tok_s']:,.0f})" if "decode_tok_s" in row else ""
        lines.append(f"| {name} | {row['tok_s']:,.0f}{dec} | {row['floor_pct']:.1f}% |")
    for name, check in res["check"].items():
        lines.append(f"check {name}: {check}")
    if "engine_tokens" in res:
        lines.append(f"engine_rows_kernel tokens against engine's: {res['engine_tokens']}")
    if "burst_tokens" in res:  # the same kernel launch by launch: every row should be equal
        lines.append(f"engine_rows_bursts tokens against engine_rows_kernel's: {res['burst_tokens']}")
    lines += [f"{key}: {val['error']}" for key, val in res.items() if key.startswith("error_") and "error" in val]
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
