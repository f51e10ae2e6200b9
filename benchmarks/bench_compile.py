"""Compile cost: time to compile, graphs and recompiles over a run, engine start-up.

For `torch.compile(model.forward, backend=B, dynamic=True)` with B = xyserve and B = inductor
(the baseline, same process): the first call's compile time, then forwards at many token counts
(1..512): the number of graphs Dynamo compiled and the recompiles (graphs after the first call).
Then the engine, in a fresh process: time from `LLM(model)` to its first finished request (compile
and, where the engine has them, CUDA-graph capture, whose time and memory the engine reports in its
stats), and the graphs compiled while it then serves a batch of mixed prompt lengths.

    python -m benchmarks.bench_compile [--quick]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from benchmarks.common import (
    attempt,
    card_name,
    cli,
    dynamo_counts,
    llama_config,
    log_recompiles,
    recompile_reasons,
    sync,
)

TOKEN_COUNTS = [1, 2, 3, 8, 17, 37, 64, 100, 129, 256, 333, 512]


def _graphs() -> int:
    return dynamo_counts()["graphs"]


def compile_cost(model, backend: str, counts: list[int]) -> dict:
    """First call's compile time and graphs; every graph after it is a recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fwd = torch.compile(model.forward, backend=backend, dynamic=True)
    device, vocab = model.device, model.config.vocab_size
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        fwd(torch.randint(0, vocab, (1, counts[0]), device=device), use_cache=False)
        sync()
        first, first_graphs = time.perf_counter() - t0, _graphs()
        t0 = time.perf_counter()
        for n in counts[1:]:
            fwd(torch.randint(0, vocab, (1, n), device=device), use_cache=False)
        sync()
    return {"first_call_s": first, "other_counts_s": time.perf_counter() - t0, "token_counts": counts,
            "graphs": _graphs(), "recompiles": _graphs() - first_graphs}


def engine_startup(size: str) -> dict:
    """In a fresh process (what a user pays): `LLM(model)` (compile, CUDA-graph capture), the first
    request, then a mixed batch of prompt lengths; graphs compiled after start-up are recompiles."""
    from xy_inductor import LLM, SamplingParams

    log_recompiles()
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).to("cuda" if cuda else "cpu",
                                                   torch.bfloat16 if cuda else torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sync()
    t0 = time.perf_counter()
    llm = LLM(model, max_model_len=2304)
    built = time.perf_counter() - t0
    llm.generate([[1, 2, 3, 4]], params, use_tqdm=False)
    sync()
    first, graphs = time.perf_counter() - t0, _graphs()
    # 3,272 tokens: the first step is bigger than every CUDA-graph bucket and runs eagerly
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(n)] for i, n in enumerate((1, 5, 37, 300, 700, 129, 2100))]
    llm.generate(prompts, params, use_tqdm=False)
    stats = {k: v for k, v in llm.stats.items() if "graph" in k or "capture" in k or k == "eager_steps"}
    return {"construct_s": built, "first_request_s": first, "graphs_at_startup": graphs,
            "recompiles_after_startup": _graphs() - graphs, "recompile_log": recompile_reasons()[-8:], **stats}


def engine_startup_fresh(size: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_compile", "--engine-startup", size],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine start-up process failed ({proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(lines[-1])


def run(quick: bool = False, size: str = "llama-3.2-1b") -> dict:
    cuda = torch.cuda.is_available()
    size = size if cuda else "tiny"
    counts = TOKEN_COUNTS if cuda and not quick else [1, 3, 17, 100]
    results: dict = {"device": card_name(), "model": size}
    attempt(results, "engine_startup", lambda: engine_startup_fresh(size))
    config = llama_config(size)
    if quick:  # the backend comparison on 2 of the model's layers (compile time grows with layers)
        config.num_hidden_layers = 2
    results["compile_cost_layers"] = config.num_hidden_layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32).eval()
    for backend in ("xyserve", "inductor"):
        attempt(results, backend, lambda: compile_cost(model, backend, counts))
    torch._dynamo.reset()
    return results


def table(results: dict) -> str:
    lines = [f"compile, {results['model']} ({results.get('compile_cost_layers')} layers for the backend rows), "
             f"{results['device']}",
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
    if len(sys.argv) == 3 and sys.argv[1] == "--engine-startup":
        print(json.dumps(engine_startup(sys.argv[2]), default=str))
    else:
        cli(run, table)
