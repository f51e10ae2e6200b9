"""The engine with and without CUDA graphs: decode at batch 1 and 16, and 64 mixed requests.

One process, one card, Llama-3.2-1B shapes (random weights, bf16). Workloads:
  decode_bs1, decode_bs16: prompt 128, 128 new tokens (bench_decode.py's workload)
  serving: 64 requests, prompts 32-1024, 128 new each (bench_engine.py's workload)
Each engine variant is one LLM (compiled and captured once) that runs all three workloads; prefix
caching is off so a repeated run recomputes its prefill as HF does. Baselines measured in the same
run: HF generate, eager with the dynamic cache (and static cache + compile with --hf-static).
Floors: decode = batch x measured copy bandwidth / weight bytes; serving = bench_engine's floor
(prefill FLOPs at the measured matmul rate + weights and KV per decode step at the bandwidth).
Per variant also: start-up (compile + capture) time and the stats, host time per decode step by
phase, and the device time of one graph replay (do_bench) to tell host-bound from device-bound.

    python -m benchmarks.bench_graphs [--budget-s 300] [--hf-static] [--variants a,b] [--kernels]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
from transformers import LlamaForCausalLM

from benchmarks.bench_engine import floor_seconds, hf_generate, workload
from benchmarks.common import (
    attempt,
    card_name,
    card_rates,
    llama_config,
    timed,
    weight_bytes,
)
from xy_inductor import LLM, SamplingParams

PROMPT, NEW = 128, 128
VARIANTS = {
    "cublas_graphs": {"compile": True, "compile_options": {"lower_gemm": False}},
    "xyserve_graphs": {"compile": True},  # the full backend: SmoothGEMM linears
    "eager_graphs": {"compile": False},
    "cublas_no_graphs": {"compile": True, "compile_options": {"lower_gemm": False}, "cuda_graphs": False},
}


def workloads(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    serving, new = workload(False, vocab)
    return {
        "decode_bs1": (torch.randint(0, vocab, (1, PROMPT), generator=g).tolist(), NEW),
        "decode_bs16": (torch.randint(0, vocab, (16, PROMPT), generator=g).tolist(), NEW),
        "serving": (serving, new),
    }


def tok_s(fn, num_new: int, repeats: int) -> dict:
    seconds, _ = timed(fn, repeats)
    return {"seconds": seconds, "tok_s": num_new / seconds}


def hf_baselines(model, loads: dict, static: bool) -> dict:
    out = {}
    for name, (prompts, new) in loads.items():
        kinds = {"hf_eager": False, "hf_static_compile": True} if static else {"hf_eager": False}
        for kind, is_static in kinds.items():
            fn = hf_generate(model, prompts, new, is_static)
            runs = 1 if name == "serving" else 2
            attempt(out, f"{name}/{kind}", lambda fn=fn, n=len(prompts) * new, r=runs: tok_s(fn, n, r))
    return out


def host_phases(llm: LLM, prompts, new) -> dict:
    """Host wall time per decode-only step, split into schedule / prepare / the rest of the step."""
    engine, runner = llm.engine, llm.engine.runner
    spent = {"schedule": 0.0, "prepare": 0.0}
    originals = {"schedule": engine.scheduler.schedule, "prepare": runner.prepare}

    def clocked(name):
        def run(*a):
            t = time.perf_counter()
            r = originals[name](*a)
            spent[name] += time.perf_counter() - t
            return r
        return run

    engine.scheduler.schedule, runner.prepare = clocked("schedule"), clocked("prepare")
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # the prefill step
    spent.update(schedule=0.0, prepare=0.0)
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    total = time.perf_counter() - start
    engine.scheduler.schedule, runner.prepare = originals["schedule"], originals["prepare"]
    ms = {k: 1e3 * v / steps for k, v in spent.items()}
    return {"steps": steps, "ms_per_step": 1e3 * total / steps, **{f"{k}_ms": v for k, v in ms.items()}}


def replay_ms(llm: LLM, num_tokens: int) -> float | None:
    """Device time of one replay of the bucket that holds num_tokens (its last step's data)."""
    from triton.testing import do_bench

    runner = llm.engine.runner
    layout = next((lay for lay in runner.buckets if lay.num_tokens >= num_tokens), None)
    if runner.graphs is None or layout is None:
        return None
    return do_bench(lambda: runner.graphs.replay(layout), warmup=20, rep=100, return_mode="median")


def replay_kernels(llm: LLM, num_tokens: int, n: int = 5) -> dict | None:
    """Device time per replay by kernel (torch.profiler over n replays): where the graph spends."""
    from torch.profiler import ProfilerActivity, profile

    runner = llm.engine.runner
    layout = next((lay for lay in runner.buckets if lay.num_tokens >= num_tokens), None)
    if runner.graphs is None or layout is None:
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            runner.graphs.replay(layout)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            rows.append((e.key[:90], round(us / n, 1), e.count // n))
    rows.sort(key=lambda r: -r[1])
    return {"total_us": round(sum(r[1] for r in rows), 1), "kernels": len(rows),
            "calls": sum(r[2] for r in rows), "top_us_calls": rows[:24]}


def engine_variant(model, kwargs: dict, loads: dict, kernels: bool = False) -> dict:
    t0 = time.perf_counter()
    llm = LLM(model, max_model_len=2048, enable_prefix_caching=False, **kwargs)
    res: dict = {"startup_s": time.perf_counter() - t0}
    for name, (prompts, new) in loads.items():
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)

        def generate(prompts=prompts, params=params):
            return llm.generate(prompts, params, use_tqdm=False)

        runs = 1 if name == "serving" else 5  # median of 5 (the decode suite too)
        attempt(res, name, lambda fn=generate, n=len(prompts) * new, r=runs: tok_s(fn, n, r))
    for name in ("decode_bs1", "decode_bs16"):
        prompts, new = loads[name]
        attempt(res, f"{name}/host", lambda p=prompts, n=new: host_phases(llm, p, n))
        attempt(res, f"{name}/replay_ms", lambda p=prompts: replay_ms(llm, len(p)))
        if kernels:
            attempt(res, f"{name}/replay_kernels", lambda p=prompts: replay_kernels(llm, len(p)))
    res["stats"] = {k: v for k, v in llm.stats.items() if not k.startswith(("prefix", "kv_", "spec"))}
    model.set_attn_implementation("sdpa")
    return res


def run(budget_s: float, hf_static: bool, variants: list[str], kernels: bool = False) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    config = llama_config("llama-3.2-1b")
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    rates = card_rates()
    loads = workloads(config.vocab_size)
    res: dict = {"device": card_name(), "torch": torch.__version__, "card": rates, "weight_bytes": weight_bytes(model)}
    res["hf"] = hf_baselines(model, loads, hf_static)
    model.set_attn_implementation("sdpa")
    floors = {f"decode_bs{b}": b * rates["copy_bytes_per_s"] / res["weight_bytes"] for b in (1, 16)}
    prompts, new = loads["serving"]
    floors["serving"] = len(prompts) * new / floor_seconds(config, prompts, new, rates)
    res["floor_tok_s"] = floors
    res["engine"] = {}
    for name in variants:
        if time.perf_counter() - start > budget_s:
            res["engine"][name] = {"skipped": "time budget"}
            continue
        attempt(res["engine"], name, lambda kw=VARIANTS[name]: engine_variant(model, kw, loads, kernels))
        gc.collect()  # the variant's engine (KV cache, graphs) goes before the next one is built
        torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - start:.0f}s] {name}: {json.dumps(res['engine'][name], default=str)[:600]}",
              flush=True)
    return res


def table(res: dict) -> str:
    lines = [f"{res['device']}, torch {res['torch']}; tok/s (x HF eager of the same run, % of floor)",
             "| variant | decode bs1 | decode bs16 | 64 requests | start-up s |", "| --- | --- | --- | --- | --- |"]
    names = ("decode_bs1", "decode_bs16", "serving")

    def cell(r, w):
        if "tok_s" not in r.get(w, {}):
            return "-"
        base = res["hf"].get(f"{w}/hf_eager", {}).get("tok_s")
        t = r[w]["tok_s"]
        return f"{t:,.0f} ({t / base:.2f}x, {100 * t / res['floor_tok_s'][w]:.0f}%)" if base else f"{t:,.0f}"

    for kind in ("hf_eager", "hf_static_compile"):
        row = {w: res["hf"].get(f"{w}/{kind}", {}) for w in names}
        if any("tok_s" in v for v in row.values()):
            lines.append(f"| HF {kind[3:]} | " + " | ".join(cell(row, w) for w in names) + " | |")
    for name, r in res["engine"].items():
        start = f"{r['startup_s']:.0f}" if "startup_s" in r else r.get("error", r.get("skipped", ""))[:60]
        lines.append(f"| {name} | " + " | ".join(cell(r, w) for w in names) + f" | {start} |")
    lines.append("| floor | " + " | ".join(f"{res['floor_tok_s'][w]:,.0f}" for w in names) + " | |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=300.0, help="start no engine variant after this")
    p.add_argument("--hf-static", action="store_true", help="also HF static cache + compile (slow to compile)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--kernels", action="store_true", help="profile the kernels of one decode replay")
    args = p.parse_args()
    result = run(args.budget_s, args.hf_static, args.variants.split(","), args.kernels)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_graphs.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
    print(table(result))
