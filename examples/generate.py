"""Generate for a batch of mixed-length prompts with the xyserve engine; check against HF generate.

    python examples/generate.py                      # a small random Llama, on CPU in seconds
    python examples/generate.py --model PATH --num-prompts 32 --max-tokens 64

Greedy tokens of every prompt must equal HF `generate` on that prompt alone. Throughput is
printed for HF (one prompt at a time, and one left-padded batch) and for the engine (all prompts
in one continuously batched run: chunked prefills and decodes share each step).
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from xy_inductor import LLM, SamplingParams


def small_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def hf_one_by_one(model, prompts, max_tokens) -> tuple[list[list[int]], float]:
    start, out = time.perf_counter(), []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out, time.perf_counter() - start


@torch.inference_mode()
def hf_padded_batch(model, prompts, max_tokens) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                   do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local checkpoint folder (default: a small random Llama)")
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-prompt-len", type=int, default=192)
    parser.add_argument("--budget", type=int, default=256, help="engine token budget per step")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model).eval() if args.model else small_llama()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.max_prompt_len + 1, (args.num_prompts,), generator=g).tolist()
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    new_tokens = args.num_prompts * args.max_tokens

    expected, hf_seconds = hf_one_by_one(model, prompts, args.max_tokens)
    hf_batch_seconds = hf_padded_batch(model, prompts, args.max_tokens)

    llm = LLM(model, max_num_batched_tokens=args.budget, compile=args.compile)  # switches attention to xyserve
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    engine_seconds = time.perf_counter() - start

    same = sum(o.token_ids == e for o, e in zip(outs, expected))
    print(f"prompts: {args.num_prompts} of {min(lengths)}-{max(lengths)} tokens, {args.max_tokens} new tokens each")
    print(f"tokens equal to HF generate: {same}/{len(prompts)}")
    print(f"HF generate, one prompt at a time: {new_tokens / hf_seconds:8.1f} tok/s")
    print(f"HF generate, padded batch:         {new_tokens / hf_batch_seconds:8.1f} tok/s")
    print(f"xyserve engine:                    {new_tokens / engine_seconds:8.1f} tok/s "
          f"({llm.stats['steps']} steps, budget {args.budget})")
    if same != len(prompts):
        raise SystemExit("mismatch against HF generate")


if __name__ == "__main__":
    main()
