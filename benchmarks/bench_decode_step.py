"""A whole batch-1 decode step in one persistent launch (ascend_kernels/decode_step_kernel.py) against HF
and the engine, Llama-3.2-1B shapes, bf16, random weights, prompt 128, 128 new tokens (issue 6).

`DecodeStep` runs the kernel on its own paged KV cache (the engine's layout stacked over layers, a
shuffled block table); the kernel picks each greedy token and steps the position, so replaying its
CUDA graph decodes token after token with no host work between steps. `xyserve_engine_decode_megakernel`
is the engine with `decode_megakernel=True` (its batch-1 decode steps on the same kernel, in bursts of up to
8 launches per engine step; `..._no_burst` runs one launch per engine step). The engines' rows also give
the decode rate alone: NEW - 1 tokens over the time past a 1-token generate.
Correctness: logits of one step and greedy tokens over NEW steps, each against HF float32 (the
reference) next to HF bf16's own distance from it.

    python -m benchmarks.bench_decode_step [--quick]      (sm_90 only)
"""
from __future__ import annotations

import copy
import gc
import math

import torch
from transformers import LlamaForCausalLM

from benchmarks.common import (
    card_name,
    card_rates,
    cli,
    is_sm90,
    llama_config,
    rel_err,
    weight_bytes,
)

PROMPT, NEW, BS = 128, 128, 16


def _cache_kv(cache, layer: int):
    """(keys, values) [1, NKV, n, D] of one layer of an HF cache (transformers 5: .layers)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class DecodeStep:
    """One request's batch-1 greedy decode on the whole-step kernel (ascend_kernels/decode_step.py):
    the model's stacked weights, a paged cache of its own, and CUDA graphs of `launches_per_graph`
    launches (the kernel picks each token and steps the position itself)."""

    def __init__(self, model: LlamaForCausalLM, max_len: int, launches_per_graph: int = 1):
        from ascend_kernels.decode_step import DecodeStepKernel
        from xy_inductor.engine.decode_kernel import stack_weights

        w = stack_weights(model)
        self.nl, self.nkv, self.d = w.dims["NL"], w.num_kv_heads, w.head_dim
        self.embed, self.launches_per_graph = w.embed, launches_per_graph
        dev = w.embed.device
        num_blocks = math.ceil(max_len / BS)
        k_cache = torch.zeros((self.nl, num_blocks, BS, self.nkv, self.d), device=dev, dtype=w.embed.dtype)
        self.kernel = DecodeStepKernel(w, k_cache, torch.zeros_like(k_cache), BS)
        self.block_table = torch.randperm(num_blocks, device=dev).to(torch.int32)  # paging, not contiguity
        self.pos = torch.zeros(1, device=dev, dtype=torch.int32)
        self.token = torch.zeros(1, device=dev, dtype=torch.int64)
        self.tokens_out = torch.zeros(max_len + 1, device=dev, dtype=torch.int64)  # [p]: the token after p
        self.graph = None

    @property
    def logits(self) -> torch.Tensor:
        return self.kernel.logits

    def load_prompt(self, cache, token: int, n: int) -> None:
        """Copy an HF cache of n positions into the paged cache; the next step decodes `token` at n."""
        p = torch.arange(n, device=self.embed.device)
        slots = self.block_table[p // BS].long() * BS + p % BS
        for layer in range(self.nl):
            k, v = _cache_kv(cache, layer)
            for src, dst in ((k, self.kernel.k_cache), (v, self.kernel.v_cache)):
                dst[layer].view(-1, self.nkv, self.d)[slots] = src[0, :, :n].transpose(0, 1).to(dst.dtype)
        self.pos.fill_(n)
        self.token.fill_(token)

    def _launch(self):
        self.kernel.launch(self.token, self.pos, self.block_table, self.tokens_out, loop=True)

    def step(self) -> None:
        """`launches_per_graph` decode steps (graph replays once captured)."""
        if self.graph is None:
            state = [t.clone() for t in (self.pos, self.token)]
            self._launch()  # compile outside the capture
            for t, saved in zip((self.pos, self.token), state):
                t.copy_(saved)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for _ in range(self.launches_per_graph):
                    self._launch()
        self.graph.replay()


def _agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _float_cache(cache, num_layers: int):
    """A float32 copy of an HF cache."""
    cache = copy.deepcopy(cache)
    for layer in range(num_layers):
        k, v = _cache_kv(cache, layer)
        k.data, v.data = k.data.float(), v.data.float()
    return cache


@torch.no_grad()
def _one_step(model, ref, ids):
    """HF bf16 prefill -> t0 and the prompt cache; the logits of decoding t0 from that cache by the bf16
    model and by its float32 copy (the reference: same inputs, no rounding of activations)."""
    out = model(ids, use_cache=True)
    t0 = out.logits[0, -1].argmax().view(1, 1)
    prompt_cache = copy.deepcopy(out.past_key_values)
    cache32 = _float_cache(out.past_key_values, model.config.num_hidden_layers)
    logits = model(t0, past_key_values=out.past_key_values).logits[0, -1].float()
    logits_ref = ref(t0, past_key_values=cache32).logits[0, -1]
    return t0, prompt_cache, logits, logits_ref


@torch.no_grad()
def _greedy_from(model, cache, t0: int, n: int) -> list[int]:
    """n greedy tokens by HF eager from a prompt cache (copied) and its first token t0 (t0 included)."""
    cache, tokens = copy.deepcopy(cache), [t0]
    for _ in range(n - 1):
        logits = model(torch.tensor([[tokens[-1]]], device="cuda"), past_key_values=cache).logits[0, -1]
        tokens.append(logits.argmax().item())
    return tokens


def _megakernel_decode(step: DecodeStep, cache, t0: int, repeats: int = 3) -> tuple[list[int], list[float]]:
    """Greedy tokens from the prompt cache (graph replays, no host work between steps), and the seconds
    per step of each timed run (the steps a whole number of graphs covers, up to NEW - 1)."""
    n = (NEW - 1) // step.launches_per_graph * step.launches_per_graph
    per_step = []
    for _ in range(repeats + 1):  # the first run captures the graph
        step.load_prompt(cache, t0, PROMPT)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n // step.launches_per_graph):
            step.step()
        end.record()
        torch.cuda.synchronize()
        per_step.append(start.elapsed_time(end) / 1e3 / n)
    return [t0] + step.tokens_out[PROMPT:PROMPT + n].tolist(), per_step[1:]


# the engine's variants: plain, the kernel with decode bursts (the default 8 steps), the kernel one step a
# time, and bursts of 32 (less host work per token; a request arriving mid-burst waits up to 32 steps)
ENGINES = {"xyserve_engine": {}, "xyserve_engine_decode_megakernel": {"decode_megakernel": True},
           "xyserve_engine_decode_megakernel_no_burst": {"decode_megakernel": True, "decode_burst": 1},
           "xyserve_engine_decode_megakernel_burst_32": {"decode_megakernel": True, "decode_burst": 32}}


def _engine_row(model, prompts, kwargs: dict) -> tuple[dict, list[int]]:
    """tok/s of generate (prefill + NEW tokens, like HF's rows) and the decode rate alone: NEW - 1 tokens
    over the time past a 1-token generate (the prefill), both medians of 3 runs after a warm-up."""
    from benchmarks.bench_decode import _engine, _tok_s
    from benchmarks.common import timed
    from xy_inductor import SamplingParams

    llm, fn = _engine(model, prompts, **kwargs)
    row = _tok_s(fn, 1, 3)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    row["prefill_seconds"], _ = timed(lambda: llm.generate(prompts, one, use_tqdm=False), 3)
    row["decode_tok_s"] = (NEW - 1) / (row["seconds"] - row["prefill_seconds"])
    before = dict(llm.stats)
    tokens = fn()[0].token_ids
    for key, name in (("steps", "engine_steps_per_generate"), ("decode_megakernel_steps", "kernel_steps_per_generate")):
        if key in before:
            row[name] = llm.stats[key] - before[key]
    return row, tokens


def run(quick: bool = False) -> dict:
    if not is_sm90():
        return {"skipped": "needs an sm_90 GPU"}
    from benchmarks.bench_decode import _hf, _tok_s

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to(device="cuda", dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    ref = copy.deepcopy(model).float()
    rates = card_rates()
    res = {"card": card_name(), "prompt": PROMPT, "new_tokens": NEW,
           "floor_tok_s": rates["copy_bytes_per_s"] / weight_bytes(model)}
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), device="cuda")
    t0, cache, logits_bf16, logits_ref = _one_step(model, ref, ids)
    step = DecodeStep(model, PROMPT + NEW + BS)
    res["kernel_grid"], res["grid_us"] = step.kernel.grid, step.kernel.grid_us  # tuned at start-up
    res["kernel_grid_long"], res["grid_us_long"] = step.kernel.grid_long, step.kernel.grid_us_long
    step.load_prompt(cache, t0.item(), PROMPT)
    step._launch()
    torch.cuda.synchronize()
    res["one_step"] = {"err_megakernel": rel_err(step.logits, logits_ref),
                       "err_hf_bf16": rel_err(logits_bf16, logits_ref),
                       "argmax_ref": logits_ref.argmax().item(), "argmax_megakernel": step.logits.argmax().item(),
                       "argmax_hf_bf16": logits_bf16.argmax().item(), "token_megakernel": step.token.item()}
    del step
    # greedy from the same start (bf16 prompt cache, t0): the float32 model is the reference
    n = NEW - 1 - (NEW - 1) % 8
    ref_tokens = _greedy_from(ref, _float_cache(cache, model.config.num_hidden_layers), t0.item(), n + 1)
    bf16_tokens = _greedy_from(model, cache, t0.item(), n + 1)
    del ref
    res["hf_bf16_greedy_agreement_with_fp32"] = _agree(bf16_tokens, ref_tokens)
    res["greedy_tokens_compared"] = n + 1
    for name, graphs in (("megakernel", 1), ("megakernel_8_steps_per_graph", 8)):
        step = DecodeStep(model, PROMPT + NEW + BS, launches_per_graph=graphs)
        tokens, per_step = _megakernel_decode(step, cache, t0.item())
        best = sorted(per_step)[len(per_step) // 2]
        res[name] = {"tok_s": 1 / best, "us_per_step": best * 1e6, "seconds_per_step": per_step,
                     "greedy_agreement": {"with_hf_fp32": _agree(tokens, ref_tokens),
                                          "with_hf_bf16": _agree(tokens, bf16_tokens)}}
        del step
    res["hf_eager"] = _tok_s(_hf(model, ids, False), 1, 1)
    if not quick:
        res["hf_static_compile"] = _tok_s(_hf(model, ids, True), 1, 2)
    tokens = {}
    for name, kwargs in ENGINES.items():
        model.set_attn_implementation("sdpa")
        res[name], tokens[name] = _engine_row(model, ids.tolist(), kwargs)
        gc.collect()
        torch.cuda.empty_cache()  # the next engine sizes its KV pool from the free memory
    res["burst_tokens_equal_single_steps"] = all(
        tokens[k] == tokens["xyserve_engine_decode_megakernel_no_burst"]
        for k in ("xyserve_engine_decode_megakernel", "xyserve_engine_decode_megakernel_burst_32"))
    for k in ("megakernel", "megakernel_8_steps_per_graph", "hf_eager", "hf_static_compile", *ENGINES):
        if k in res:
            res[k]["floor_pct"] = 100 * res[k]["tok_s"] / res["floor_tok_s"]
            if "decode_tok_s" in res[k]:
                res[k]["decode_floor_pct"] = 100 * res[k]["decode_tok_s"] / res["floor_tok_s"]
    print(res, flush=True)
    return res


def table(res: dict) -> str:
    if "megakernel" not in res:
        return str(res)
    lines = [(f"{res['card']}: Llama-3.2-1B shapes, batch 1, prompt {res['prompt']}, {res['new_tokens']} new, "
              f"floor {res['floor_tok_s']:.0f} tok/s"),
             "| variant | tok/s (generate) | % of floor | decode tok/s (past the prefill) | % of floor |",
             "| --- | --- | --- | --- | --- |"]
    for k in ("hf_eager", "hf_static_compile", *ENGINES, "megakernel", "megakernel_8_steps_per_graph"):
        if k in res:
            r = res[k]
            dec = (f"{r['decode_tok_s']:.0f} | {r['decode_floor_pct']:.1f}%" if "decode_tok_s" in r
                   else "(every step is decode) | ")
            lines.append(f"| {k} | {r['tok_s']:.0f} | {r['floor_pct']:.1f}% | {dec} |")
    one = res["one_step"]
    lines.append(f"one step: logits err vs HF fp32 {one['err_megakernel']:.1e} (HF bf16 {one['err_hf_bf16']:.1e}); "
                 f"argmax {one['argmax_megakernel']} / ref {one['argmax_ref']}; greedy tokens equal to HF fp32's: "
                 f"{res['megakernel']['greedy_agreement']['with_hf_fp32']} (HF bf16: "
                 f"{res['hf_bf16_greedy_agreement_with_fp32']}) of the first {res['greedy_tokens_compared']}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
