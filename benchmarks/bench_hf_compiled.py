"""HF generate with `model.forward = torch.compile(model.forward, backend=...)`: the backend by
itself, with no engine and no CUDA graphs (dynamic cache, batch 1, prompt 128, 64 new tokens).

Variants, one model each, all in one process on one card: HF eager, Inductor, xyserve as shipped
(on a GPU without CUDA graphs attention stays on SDPA and linears on cuBLAS: the "auto" rule) and
xyserve with both forced (`lower_attention=True, lower_gemm=True`: every attention and linear an
xyserve op launched from Python). Each variant
first runs one full-length generate (compiles, and Triton's compiles of new shapes), then the
variants are timed in turn, `repeats` rounds, so drift on the card hits them alike. Reported:
the median round's tokens per second; the prompt's logits against HF eager's (relative error); and
greedy tokens agreeing with HF eager's (in bf16 random weights leave near-ties that any change of
summation order flips, so a run diverges after a few tokens; Inductor's does too).

    python -m benchmarks.bench_hf_compiled [--quick]
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from benchmarks.common import allow_many_graphs, card_name, cli, llama_config, median_run, timed_runs

PROMPT, NEW = 128, 64
VARIANTS = {
    "hf_eager": None,
    "inductor": ("inductor", None),
    "xyserve": ("xyserve", None),
    "xyserve_lowered": ("xyserve", {"lower_attention": True, "lower_gemm": True}),
}


def _model(size: str, device: torch.device, dtype: torch.dtype, compile_with) -> LlamaForCausalLM:
    torch.manual_seed(0)  # every variant gets the same weights
    model = LlamaForCausalLM(llama_config(size)).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    if compile_with is not None:
        backend, options = compile_with
        model.forward = torch.compile(model.forward, backend=backend, dynamic=True, options=options)
    return model


def _generate(model, ids, new: int) -> torch.Tensor:
    with torch.no_grad():  # what HF generate users write; the graphs then need no gradients
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)


def _round(models: dict, ids, new: int) -> dict:
    """One timed generate per variant (each warmed up before the first round)."""
    return {name: timed_runs(lambda m=model: _generate(m, ids, new), 0)[0][0] for name, model in models.items()}


def run(quick: bool = False, size: str = "llama-3.2-1b") -> dict:
    allow_many_graphs()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype, size = (torch.bfloat16, size) if cuda else (torch.float32, "tiny")
    new, repeats = (16, 2) if quick or not cuda else (NEW, 3)
    models = {name: _model(size, device, dtype, how) for name, how in VARIANTS.items()}
    ids = torch.randint(0, models["hf_eager"].config.vocab_size, (1, PROMPT), device=device)
    with torch.no_grad():
        logits = {name: m(ids).logits.float() for name, m in models.items()}
    tokens = {name: _generate(m, ids, new)[0, PROMPT:].tolist() for name, m in models.items()}  # warm-up
    rounds = [_round(models, ids, new) for _ in range(repeats)]
    results: dict = {"device": card_name(), "model": size, "prompt": PROMPT, "new_tokens": new,
                     "dtype": str(dtype), "rounds_s": rounds}
    for name in models:
        seconds = median_run([r[name] for r in rounds])
        same = sum(a == b for a, b in zip(tokens[name], tokens["hf_eager"]))
        err = ((logits[name] - logits["hf_eager"]).norm() / logits["hf_eager"].norm()).item()
        results[name] = {"tok_s": new / seconds, "seconds": seconds, "logits_rel_err": err,
                         "tokens_equal_hf_eager": same}
    return results


def table(results: dict) -> str:
    eager = results["hf_eager"]["tok_s"]
    lines = [f"HF generate, forward compiled, {results['model']}, prompt {results['prompt']}, "
             f"{results['new_tokens']} new, batch 1, {results['device']}",
             "| variant | tok/s | x HF eager | prompt logits vs HF eager (rel. err.) | greedy tokens equal to HF eager |",
             "| --- | --- | --- | --- | --- |"]
    for name in VARIANTS:
        r = results[name]
        lines.append(f"| {name} | {r['tok_s']:,.1f} | {r['tok_s'] / eager:.2f} | {r['logits_rel_err']:.1e} | "
                     f"{r['tokens_equal_hf_eager']}/{results['new_tokens']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
