"""Compile a Hugging Face decoder with the xyserve backend, show what was lowered, check it.

    python examples/compile_hf.py                 # a small random Llama built from a config
    python examples/compile_hf.py --model PATH    # a local checkpoint folder (from_pretrained)
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import xy_inductor


def load(args) -> torch.nn.Module:
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=args.attn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local HF checkpoint folder (default: a random tiny Llama)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(args).to(device).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 12), device=device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as generate sees it for a batch of unequal prompts

    print(xy_inductor.explain(model, ids, attention_mask=mask), "\n")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        eager_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
        model.forward = torch.compile(model.forward, backend="xyserve")
        t0 = time.perf_counter()
        got = model(ids, attention_mask=mask).logits
        print(f"compiled in {time.perf_counter() - t0:.1f} s")
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
    rel = ((got - want).norm() / want.norm()).item()
    same = torch.equal(tokens, eager_tokens)
    print(f"logits vs eager: relative error {rel:.2e}")
    print(f"generate ({args.new_tokens} new tokens, greedy): tokens identical to eager: {same}")
    if rel > 1e-3 or not same:
        raise SystemExit("MISMATCH against eager")


if __name__ == "__main__":
    main()
