"""Serving-style run: Poisson arrivals at several request rates through the xyserve engine.

Requests (prompts 32-1024 tokens, 128 new, EOS ignored) arrive at exponential gaps; each engine
step first admits every request whose arrival time has passed. Reported per rate: throughput
(generated tok/s over the whole run), time to first token and time between tokens (p50 / p99).
The baseline beside it is HF `generate_batch` (continuous batching, paged cache) on the same
requests all at once, i.e. its best case at an infinite rate; HF has no arrival-driven API to
replay the same trace, so its latency columns stay empty.

    python -m benchmarks.bench_serving [--quick]
"""
from __future__ import annotations

import random
import time

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from benchmarks.common import allow_many_graphs, attempt, card_name, cli, llama_config, percentile, sync


def trace(n: int, rate: float, vocab: int, lo: int, hi: int, seed: int = 0) -> list[tuple[float, list[int]]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]))
    return out


def replay(llm, requests, new: int) -> dict:
    """Admit each request at its arrival time; step until every request finished."""
    from xy_inductor import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    engine, pending, finished = llm.engine, list(requests), []
    sync()
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            engine.add_request(pending.pop(0)[1], params)
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(pending[0][0] - now, 0.01)))
            continue
        finished += [o for o in engine.step() if o.finished]
    sync()
    wall = time.perf_counter() - start
    ttft = [o.time_to_first_token for o in finished if o.time_to_first_token is not None]
    tbt = [g for o in finished for g in o.time_between_tokens]
    return {"requests": len(finished), "seconds": wall, "tok_s": sum(len(o.token_ids) for o in finished) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "tbt_p50": percentile(tbt, 50), "tbt_p99": percentile(tbt, 99)}


def run(quick: bool = False, size: str = "llama-3.2-1b") -> dict:
    from xy_inductor import LLM

    allow_many_graphs()
    cuda = torch.cuda.is_available()
    size = size if cuda else "tiny"
    n, new, lo, hi = (16, 32, 32, 256) if (quick or not cuda) else (64, 128, 32, 1024)
    rates = ([4.0, 16.0, 64.0] if quick else [2.0, 8.0, 32.0]) if cuda else [50.0]
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).to("cuda" if cuda else "cpu",
                                                   torch.bfloat16 if cuda else torch.float32).eval()
    results: dict = {"device": card_name(), "model": size, "requests": n, "new_tokens": new, "rates": {}}
    llm = LLM(model, max_model_len=hi + new + 16, enable_prefix_caching=False)  # random prompts share nothing
    replay(llm, trace(4, 1e9, model.config.vocab_size, lo, hi, seed=99), new)  # warm-up: compile, graphs
    for rate in rates:
        attempt(results["rates"], str(rate), lambda: replay(llm, trace(n, rate, model.config.vocab_size, lo, hi, seed=int(rate)), new))
    if cuda and hasattr(model, "generate_batch"):
        model.set_attn_implementation("sdpa")  # the engine routed attention to "xyserve"
        prompts = [p for _, p in trace(n, 1.0, model.config.vocab_size, lo, hi)]
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)

        def hf():
            sync()
            t0 = time.perf_counter()
            model.generate_batch(inputs=prompts, generation_config=cfg)
            sync()
            return {"tok_s": n * new / (time.perf_counter() - t0)}
        attempt(results, "hf_generate_batch_all_at_once", hf)
    return results


def table(results: dict) -> str:
    ms = lambda s: f"{1e3 * s:.1f}" if s is not None else "-"  # noqa: E731
    lines = [f"serving (Poisson arrivals), {results['model']}, {results['requests']} requests, {results['device']}",
             "| rate (req/s) | tok/s | TTFT p50 / p99 (ms) | TBT p50 / p99 (ms) |", "| --- | --- | --- | --- |"]
    for rate, r in results["rates"].items():
        if "error" in r:
            lines.append(f"| {rate} | error: {r['error'][:60]} | | |")
        else:
            lines.append(f"| {rate} | {r['tok_s']:,.0f} | {ms(r['ttft_p50'])} / {ms(r['ttft_p99'])} | "
                         f"{ms(r['tbt_p50'])} / {ms(r['tbt_p99'])} |")
    hf = results.get("hf_generate_batch_all_at_once")
    if hf and "tok_s" in hf:
        lines.append(f"| HF generate_batch (all at once) | {hf['tok_s']:,.0f} | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
