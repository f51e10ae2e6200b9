"""Compile cost: time to compile, graphs and recompiles over a run, engine start-up.

For `torch.compile(model.forward, backend=B, dynamic=True)` with B = xyserve and B = inductor
(the baseline, same process): the first call's compile time, then forwards at many token counts
(1..512): the number of graphs Dynamo compiled and the recompiles. Then the engine: time from
`LLM(model)` to its first finished request (compile and, where the engine has them, CUDA-graph
capture, whose time and memory the engine reports in its stats).

    python -m benchmarks.bench_compile [--quick]
"""
from __future__ import annotations

import time

import torch
from transformers import LlamaForCausalLM

from benchmarks.common import attempt, card_name, cli, llama_config, sync

TOKEN_COUNTS = [1, 2, 3, 8, 17, 37, 64, 100, 129, 256, 333, 512]


def _counts() -> dict:
    c = torch._dynamo.utils.counters
    return {"graphs": c["stats"]["unique_graphs"], "recompiles": sum(c["recompiles"].values())}


def compile_cost(model, backend: str, counts: list[int]) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fwd = torch.compile(model.forward, backend=backend, dynamic=True)
    device, vocab = model.device, model.config.vocab_size
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        fwd(torch.randint(0, vocab, (1, counts[0]), device=device), use_cache=False)
        sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in counts[1:]:
            fwd(torch.randint(0, vocab, (1, n), device=device), use_cache=False)
        sync()
    return {"first_call_s": first, "other_counts_s": time.perf_counter() - t0, "token_counts": counts, **_counts()}


def engine_startup(model) -> dict:
    from xy_inductor import LLM, SamplingParams

    sync()
    t0 = time.perf_counter()
    llm = LLM(model, max_model_len=1024)
    built = time.perf_counter() - t0
    llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    sync()
    stats = {k: v for k, v in llm.stats.items() if "graph" in k or "capture" in k}
    return {"construct_s": built, "first_request_s": time.perf_counter() - t0, **stats}


def run(quick: bool = False, size: str = "llama-3.2-1b") -> dict:
    cuda = torch.cuda.is_available()
    size = size if cuda else "tiny"
    counts = TOKEN_COUNTS if cuda and not quick else [1, 3, 17, 100]
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).to("cuda" if cuda else "cpu",
                                                   torch.bfloat16 if cuda else torch.float32).eval()
    results: dict = {"device": card_name(), "model": size}
    for backend in ("xyserve", "inductor"):
        attempt(results, backend, lambda: compile_cost(model, backend, counts))
    torch._dynamo.reset()
    attempt(results, "engine_startup", lambda: engine_startup(model))
    return results


def table(results: dict) -> str:
    lines = [f"compile, {results['model']}, {results['device']}",
             "| backend | first call (s) | graphs | recompiles | other token counts (s) |", "| --- | --- | --- | --- | --- |"]
    for b in ("xyserve", "inductor"):
        r = results.get(b, {})
        if "error" in r:
            lines.append(f"| {b} | error: {r['error'][:60]} | | | |")
        elif r:
            lines.append(f"| {b} | {r['first_call_s']:.1f} | {r['graphs']} | {r['recompiles']} | {r['other_counts_s']:.1f} |")
    lines.append(f"engine start-up: {results.get('engine_startup')}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
