"""Decode speed at batch 1 and 16 (prompt 128, 128 new tokens): xyserve vs HF generate.

Variants, all in one process on one card: HF generate eager (dynamic cache), HF generate with
the static cache + torch.compile, the xyserve engine (overlapped steps, and the same engine with
async scheduling off), on a Hopper GPU the engine with `decode_megakernel=True` and
`decode_megakernel_rows=True` (each decode step one launch of the whole model: the batch-1 kernel at
batch 1, the multi-row kernel at 16), and (full runs) the engine with residual add + RMSNorm fused into the GEMVs
(opt-in), the engine with q/k/v and gate/up unfused and the engine with speculative decoding, the
target itself as the draft model (a copy run by the engine's own paged, batched, CUDA-graphed draft
runner; greedy acceptance is 100% in exact arithmetic, lower in bf16 where the draft and verify
batches round differently). Random
weights make n-gram acceptance meaningless, so n-gram drafting is not timed here. Floor: batch x
measured copy bandwidth / weight bytes (one read of the weights per decode step; KV reads ignored).

    python -m benchmarks.bench_decode [--quick]
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from benchmarks.common import (
    allow_many_graphs,
    attempt,
    card_name,
    card_rates,
    cli,
    llama_config,
    median_run,
    timed_runs,
    weight_bytes,
)

PROMPT, NEW = 128, 128


def _hf(model, ids, static: bool):
    extra = {"cache_implementation": "static"} if static else {}
    model.generation_config.eos_token_id = None

    @torch.inference_mode()
    def go():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, **extra)
    return go


def _engine(model, prompts, llm=None, **engine_kwargs):
    from xy_inductor import LLM, SamplingParams

    # prefix caching off: the timed run repeats the warm-up's prompts and would skip their prefill
    llm = llm or LLM(model, max_model_len=PROMPT + NEW + 64, enable_prefix_caching=False, **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    return llm, (lambda: llm.generate(prompts, params, use_tqdm=False))


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _tok_s(fn, batch: int, repeats: int = 2) -> dict:
    """The median run's rate, and every run's seconds (a generate now and then takes 10-30% longer
    on the device machines, so the slower of two runs overstated the spread)."""
    times, _ = timed_runs(fn, repeats)
    seconds = median_run(times)
    return {"seconds": seconds, "tok_s": batch * NEW / seconds, "runs_s": [round(t, 5) for t in times]}


def _in_order(llm, prompts, batch: int, repeats: int) -> dict:
    """The same engine with async scheduling off: the host schedules a step only after reading
    the last one's tokens (what overlapping hides)."""
    overlap, llm.engine.async_scheduling = llm.engine.async_scheduling, False
    try:
        return _tok_s(_engine(None, prompts, llm)[1], batch, repeats)
    finally:
        llm.engine.async_scheduling = overlap


def _spec(model, prompts, batch: int, repeats: int) -> dict:
    llm, fn = _engine(model, prompts, speculative={"method": "draft_model", "draft_model": model,
                                                   "num_speculative_tokens": 4})
    out = _tok_s(fn, batch, repeats)
    out["acceptance_rate"] = llm.stats.get("spec_acceptance_rate")
    return out


def run(quick: bool = False, size: str = "llama-3.2-1b") -> dict:
    allow_many_graphs()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = "tiny" if device.type != "cuda" else size
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).to(device=device, dtype=dtype).eval()
    rates = card_rates()
    results: dict = {"device": card_name(), "model": size, "prompt": PROMPT, "new_tokens": NEW, "card": rates}
    engine: dict = {}
    # median of 5 after a warm-up on a GPU (a run is 0.2-1.3 s; the compiles dominate the suite's time)
    repeats = 5 if device.type == "cuda" else 2
    for batch in (1, 16):
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=device)
        prompts = ids.tolist()
        row: dict = {}
        attempt(row, "hf_eager", lambda: _tok_s(_hf(model, ids, False), batch, 1))
        if device.type == "cuda":
            attempt(row, "hf_static_compile", lambda: _tok_s(_hf(model, ids, True), batch, repeats))
        model.set_attn_implementation("sdpa")
        def xyserve():  # one engine serves both batch sizes (built, compiled, captured once, like a server)
            engine["llm"], fn = _engine(model, prompts, engine.get("llm"))
            return _tok_s(fn, batch, repeats)
        attempt(row, "xyserve", xyserve)
        if engine.get("llm") is not None:  # A/B on the same engine: each step waits for its tokens
            attempt(row, "xyserve_in_order", lambda: _in_order(engine["llm"], prompts, batch, repeats))
        model.set_attn_implementation("sdpa")
        if _hopper():  # decode steps as one launch of the whole model (opt-in): batch 1 on the batch-1
            def megakernel():  # kernel, 16 rows on the multi-row one; one engine for both batch sizes
                opts = {"decode_megakernel": True, "decode_megakernel_rows": True}
                engine["megakernel"], fn = _engine(model, prompts, engine.get("megakernel"), **opts)
                return _tok_s(fn, batch, repeats)
            attempt(row, "xyserve_decode_megakernel", megakernel)
            model.set_attn_implementation("sdpa")
        if not quick:  # A/B in the same run: residual add + RMSNorm (+ SiLU x up) fused into the GEMVs
            def norms_fused():  # (lowering/norm_linear.py; opt-in); one engine for both batch sizes
                opts = {"compile_options": {"lower_gemm": False, "fuse_norm_linear": True}}
                engine["norms_fused"], fn = _engine(model, prompts, engine.get("norms_fused"), **opts)
                return _tok_s(fn, batch, repeats)
            attempt(row, "xyserve_norms_fused", norms_fused)
            model.set_attn_implementation("sdpa")
        if not quick:  # A/B in the same run: q/k/v and gate/up as separate GEMMs (the weights stay packed)
            unfused = {"compile_options": {"lower_gemm": False, "fuse_sibling_linears": False}}
            attempt(row, "xyserve_unfused", lambda: _tok_s(_engine(model, prompts, **unfused)[1], batch, repeats))
            model.set_attn_implementation("sdpa")
        if not quick:  # the speculative row (HF-eager self-draft: slow by construction) in full runs
            attempt(row, "xyserve_spec_self_draft", lambda: _spec(model, prompts, batch, repeats))
            model.set_attn_implementation("sdpa")
        if rates:
            row["floor"] = {"tok_s": batch * rates["copy_bytes_per_s"] / weight_bytes(model)}
        results[f"batch_{batch}"] = row
    return results


def table(results: dict) -> str:
    lines = [f"decode, {results['model']}, prompt {results['prompt']}, {results['new_tokens']} new, {results['device']}",
             "| batch | variant | tok/s | x HF eager | x HF static+compile | % of floor | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in ("batch_1", "batch_16"):
        row = results.get(key, {})
        eager = row.get("hf_eager", {}).get("tok_s")
        static = row.get("hf_static_compile", {}).get("tok_s")
        floor = row.get("floor", {}).get("tok_s")
        plain = row.get("xyserve", {}).get("tok_s")
        for name, r in row.items():
            if "error" in r:
                lines.append(f"| {key[6:]} | {name} | error: {r['error'][:60]} | | | | |")
                continue
            t = r["tok_s"]
            f = lambda b: f"{t / b:.2f}" if b else ""  # noqa: E731
            note = ""
            if r.get("acceptance_rate") is not None:
                note = f"acceptance {100 * r['acceptance_rate']:.0f}%, {f(plain)}x plain xyserve"
            share = f"{100 * t / floor:.0f}%" if floor else ""
            lines.append(f"| {key[6:]} | {name} | {t:,.0f} | {f(eager)} | {f(static)} | {share} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
