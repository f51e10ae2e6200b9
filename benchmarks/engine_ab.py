"""Engine A/B in one process: the engines the `ab_*` scripts compare, timed the same way.

Each variant's engine is built and run inside that variant's context manager (which switches the
path under test: a CUDA graph captures whatever the context selects while the engine is built).
The variants alternate round by round, so a drifting clock or a slow spell of the machine falls
on all of them alike.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import llama_config, sync


def engine_ab(model: torch.nn.Module, variants: dict[str, Callable[[], contextlib.AbstractContextManager]], *,
              batches: tuple[int, ...] = (16, 1), rounds: int = 4, repeats: int = 3, prompt_len: int = 128,
              new_tokens: int = 128, **engine_kwargs) -> dict:
    """Greedy generates of `prompt_len` random tokens / `new_tokens` new at each batch size.

    Returns '{variant}/bs{b}': the median generate (ms), its tok/s and every run (ms), over
    `rounds` x `repeats` timed generates; 'tokens_equal_bs{b}': every variant's tokens equal the
    first variant's.
    """
    from xy_inductor import LLM, SamplingParams

    engines = {}
    for name, switch in variants.items():
        with switch():
            engines[name] = LLM(model, **engine_kwargs)
        model.set_attn_implementation("sdpa")  # the next engine takes the model over again
    g = torch.Generator().manual_seed(0)
    loads = {b: torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=g).tolist() for b in batches}
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    times: dict[str, list[float]] = {f"{n}/bs{b}": [] for n in engines for b in loads}
    tokens: dict[str, list] = {}
    for _ in range(rounds):
        for name, llm in engines.items():
            with variants[name]():
                for b, prompts in loads.items():
                    tokens[f"{name}/bs{b}"] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                    for _ in range(repeats):
                        sync()
                        start = time.perf_counter()
                        llm.generate(prompts, params, use_tqdm=False)
                        sync()
                        times[f"{name}/bs{b}"].append(time.perf_counter() - start)
    res: dict = {}
    for key, runs in times.items():
        b = int(key.split("bs")[1])
        res[key] = {"median_ms": 1e3 * statistics.median(runs), "tok_s": b * new_tokens / statistics.median(runs),
                    "runs_ms": [round(1e3 * r, 2) for r in runs]}
    first = next(iter(engines))
    for b in loads:
        res[f"tokens_equal_bs{b}"] = all(tokens[f"{n}/bs{b}"] == tokens[f"{first}/bs{b}"] for n in engines)
    return res


def llama_1b_ab(variants: dict[str, Callable[[], contextlib.AbstractContextManager]], quick: bool) -> dict:
    """engine_ab as the ab_* scripts run it: a Llama-3.2-1B-shaped model (random weights, seed 0, bf16, on
    the GPU), batches 16 and 1, 1 round with `quick` else 4, a 1,200-block cache without prefix caching."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to(device="cuda", dtype=torch.bfloat16).eval()
    return engine_ab(model, variants, rounds=1 if quick else 4, max_model_len=320, enable_prefix_caching=False,
                     num_kv_blocks=1200)
