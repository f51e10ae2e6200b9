"""End-to-end generation: the xyserve engine vs Hugging Face generate, one run, one card.

Workload (DESIGN.md): Llama-3.2-1B shapes, random weights, bf16; 64 requests with prompts of
32-1024 tokens (seeded uniform) and 128 new tokens each (EOS ignored). Reported: generated
tokens per second for
  - HF generate, left-padded batch, dynamic cache (eager SDPA)
  - HF generate, left-padded batch, static cache + torch.compile (HF's own auto-compile)
  - HF generate_batch (continuous batching, paged cache), where the installed transformers has it
  - the xyserve engine, eager model and model compiled with the xyserve backend
plus a floor from this card's measured bf16 matmul rate and copy bandwidth: prefill FLOPs at the
matmul rate + one weight read and the KV reads per decode step at the copy bandwidth.
A correctness check runs first: tiny fp32 Llama on the GPU, engine greedy == HF generate.

    python -m benchmarks.bench_engine            # full run (GPU), JSON to $OUT or stdout
    python -m benchmarks.bench_engine --quick    # GPU: fewer variants; CPU: tiny shapes, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from benchmarks.common import allow_many_graphs, attempt, card_rates, llama_config, sync, timed
from xy_inductor import LLM, SamplingParams


def workload(quick: bool, vocab: int) -> tuple[list[list[int]], int]:
    g = torch.Generator().manual_seed(0)
    n, lo, hi, new = (8, 8, 64, 16) if quick else (64, 32, 1024, 128)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths], new


def padded(prompts, device):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.inference_mode()
def hf_generate(model, prompts, new, static: bool):
    ids, mask = padded(prompts, model.device)
    extra = {"cache_implementation": "static"} if static else {}
    model.generation_config.eos_token_id = None
    return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, **extra)


def hf_generate_batch(model, prompts, new):
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    return lambda: model.generate_batch(inputs=prompts, generation_config=config)


def engine_run(llm, prompts, new):
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    return lambda: llm.generate(prompts, params, use_tqdm=False)


def profile_steps(engine, n: int = 3) -> dict:
    """torch.profiler over n steps: the top ops by self CPU and by device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            engine.step()
        sync()
    avg = prof.key_averages()
    return {"cpu": avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60),
            "cuda": avg.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)}


def step_breakdown(llm, prompts, new) -> dict:
    """Where a step's time goes: each phase timed with the device synchronised around it."""
    engine, runner = llm.engine, llm.engine.runner
    engine.async_scheduling = False  # phases timed one after another, the device synchronised
    phases = {"schedule": 0.0, "prepare": 0.0, "forward": 0.0, "sample_update": 0.0}
    steps = {"decode_only": [0, 0.0], "with_prefill": [0, 0.0]}

    def clock(name, fn):
        def wrapped(*a, **k):
            sync()
            t = time.perf_counter()
            r = fn(*a, **k)
            sync()
            phases[name] += time.perf_counter() - t
            return r
        return wrapped

    engine.scheduler.schedule = clock("schedule", engine.scheduler.schedule)
    runner.prepare = clock("prepare", runner.prepare)
    runner.forward = clock("forward", runner.forward)
    engine.sampler.sample = clock("sample_update", engine.sampler.sample)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    kind = {}
    execute = runner.execute

    def classify(out):
        kind["decode_only"] = all(r.stage.value == "decode" for r in out.rows)
        return execute(out)

    runner.execute = classify
    start, profiled = time.perf_counter(), {}
    while engine.has_unfinished():
        if not profiled and engine.num_steps > 20 and torch.cuda.is_available():
            profiled = profile_steps(engine)
        t = time.perf_counter()
        engine.step()
        sync()
        key = "decode_only" if kind["decode_only"] else "with_prefill"
        steps[key][0] += 1
        steps[key][1] += time.perf_counter() - t
    total = time.perf_counter() - start
    return {"total_s": total, "phases_s": phases, "profile": profiled,
            "steps": {k: {"count": c, "seconds": s, "ms_per_step": 1e3 * s / max(c, 1)} for k, (c, s) in steps.items()}}


def floor_seconds(config: LlamaConfig, prompts, new, rates) -> float | None:
    if not rates:
        return None
    params = sum(p.numel() for p in LlamaForCausalLM(config).to("meta").parameters())
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    prefill = 2 * params * sum(map(len, prompts)) / rates["matmul_flops"]
    # each decode step reads the weights once and every request's KV so far
    kv_reads = sum(kv_per_token * (len(p) + i) for p in prompts for i in range(new))
    decode = (new * params * 2 + kv_reads) / rates["copy_bytes_per_s"]
    return prefill + decode


def check_correctness(device) -> dict:
    """Tiny fp32 Llama on the device: engine greedy tokens == HF generate, prompt by prompt."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to(device).eval()
    prompts, _ = workload(True, 1024)
    prompts += [[5] * 300, [7]]
    expected = []
    for p in prompts:
        out = model.generate(torch.tensor([p], device=device), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        expected.append(out[0, len(p):].tolist())
    llm = LLM(model, max_num_batched_tokens=128, compile=False)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    same = sum(o.token_ids == e for o, e in zip(outs, expected))
    return {"prompts": len(prompts), "equal_to_hf": same}


ENGINES = ("xyserve_eager", "xyserve_compiled", "xyserve_compiled_cublas")


def run(quick: bool = False, baselines: bool = True, engines=ENGINES, breakdown: bool = False) -> dict:
    allow_many_graphs()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small = quick and device.type != "cuda"  # the CPU smoke run; on a GPU --quick keeps real shapes
    config = llama_config("tiny" if small else "llama-3.2-1b")
    prompts, new = workload(small, config.vocab_size)
    if quick and device.type == "cuda":
        # the engine's default (cuBLAS linears) only; eager and SmoothGEMM variants in full runs
        engines = [e for e in engines if e == "xyserve_compiled_cublas"]
    num_new = len(prompts) * new
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "requests": len(prompts), "new_tokens_each": new,
                     "prompt_tokens": sum(map(len, prompts))}
    import transformers

    results["transformers"] = transformers.__version__
    attempt(results, "correctness", lambda: check_correctness(device))
    rates = card_rates()
    results["card"] = rates
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()

    def tok_s(fn, repeats=1):
        seconds, _ = timed(fn, repeats)
        return {"seconds": seconds, "tok_s": num_new / seconds}

    attempt(results, "hf_dynamic", lambda: tok_s(hf_generate(model, prompts, new, static=False)))
    if device.type == "cuda" and baselines:
        attempt(results, "hf_static_compile", lambda: tok_s(hf_generate(model, prompts, new, static=True)))
    if hasattr(model, "generate_batch") and not small and baselines:
        attempt(results, "hf_generate_batch", lambda: tok_s(hf_generate_batch(model, prompts, new), repeats=0))
    model.set_attn_implementation("sdpa")
    variants = {
        "xyserve_eager": {"compile": False},
        "xyserve_compiled": {"compile": True, "compile_options": {}},  # xyserve backend: SmoothGEMM + Inductor
        "xyserve_compiled_cublas": {"compile": True, "compile_options": {"lower_gemm": False}},
    }
    for name, kwargs in variants.items():
        if name not in engines:
            continue

        def engine(kwargs=kwargs):
            # prefix caching off: the timed run repeats the warm-up's prompts (HF has no such cache)
            llm = LLM(model, max_model_len=2048, enable_prefix_caching=False, **kwargs)
            out = tok_s(engine_run(llm, prompts, new))
            out.update(steps_per_run=llm.stats["steps"] // 2, kv_blocks=llm.stats["kv_blocks"])
            if llm.engine.async_scheduling:  # A/B on the same engine: each step waits for its tokens
                llm.engine.async_scheduling = False
                out["in_order"] = tok_s(engine_run(llm, prompts, new), repeats=0)
            if breakdown:
                out["breakdown"] = step_breakdown(llm, prompts, new)
            model.set_attn_implementation("sdpa")
            return out
        attempt(results, name, engine)
    floor = floor_seconds(config, prompts, new, rates)
    if floor:
        results["floor"] = {"seconds": floor, "tok_s": num_new / floor}
    return results


def table(results: dict) -> str:
    names = ["hf_dynamic", "hf_static_compile", "hf_generate_batch", *ENGINES, "floor"]
    base = results.get("hf_dynamic", {}).get("tok_s")
    lines = [f"{results['device']}  torch {results['torch']}  transformers {results['transformers']}",
             f"correctness: {results.get('correctness')}", "| run | tok/s | x HF dynamic |", "| --- | --- | --- |"]
    for n in names:
        r = results.get(n)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {n} | error: {r['error'][:80]} | |")
        else:
            for label, x in ((n, r), (f"{n}, async scheduling off", r.get("in_order"))):
                if x:
                    ratio = f"{x['tok_s'] / base:.2f}" if base else ""
                    lines.append(f"| {label} | {x['tok_s']:,.0f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-slow-baselines", action="store_true", help="skip HF static+compile and generate_batch")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engine variants")
    parser.add_argument("--breakdown", action="store_true", help="time step phases and profile 3 steps")
    args = parser.parse_args()
    res = run(quick=args.quick, baselines=not args.no_slow_baselines, engines=args.engines.split(","),
              breakdown=args.breakdown)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_engine.json"), "w") as f:
            json.dump(res, f, indent=2, default=str)
    print(json.dumps(res, indent=1, default=str) if not out_dir else "")
    print(table(res))
    for name in ENGINES:
        b = res.get(name, {}).get("breakdown")
        if b:
            print(name, json.dumps({k: v for k, v in b.items() if k != "profile"}, default=str))
            for kind, text in b.get("profile", {}).items():
                print(f"{name} profile by {kind}:\n{text}")
