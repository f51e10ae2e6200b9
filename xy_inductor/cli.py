"""`xyserve` command line.

    xyserve generate --model PATH --prompt "Hello" --prompt "Bye" --max-tokens 32 > out.jsonl
    xyserve generate --model PATH --prompts-file prompts.txt --output out.jsonl
    xyserve generate --model PATH --prompt "..." --draft-model SMALL_PATH --num-speculative-tokens 4
    xyserve explain --model PATH --prompt "Hello"

A prompts file holds one prompt per line, or JSON lines with "prompt" (text) or
"prompt_token_ids" (a list of ids). generate writes one JSON line per prompt, in prompt order.
"""
from __future__ import annotations

import argparse
import json
import sys


def _read_prompts(args) -> list:
    prompts: list = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    record = json.loads(line)
                    prompts.append(record["prompt_token_ids"] if "prompt_token_ids" in record else record["prompt"])
                else:
                    prompts.append(line)
    if args.token_ids:
        prompts = [[int(t) for t in p.split()] if isinstance(p, str) else p for p in prompts]
    if not prompts:
        raise SystemExit("xyserve generate: no prompts (use --prompt or --prompts-file)")
    return prompts


def _engine_kwargs(args) -> dict:
    kwargs = {"compile": args.compile, "device": args.device, "dtype": args.dtype}
    for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size", "num_kv_blocks"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.draft_model:
        kwargs["speculative"] = {"method": "draft_model", "draft_model": args.draft_model,
                                 "num_speculative_tokens": args.num_speculative_tokens}
    elif args.ngram:
        kwargs["speculative"] = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
    return kwargs


def _generate(args) -> int:
    from xy_inductor import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or [],
        ignore_eos=args.ignore_eos,
    )
    prompts = _read_prompts(args)
    llm = LLM(args.model, **_engine_kwargs(args))
    outs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    sink = open(args.output, "w", encoding="utf-8") if args.output not in (None, "-") else sys.stdout
    try:
        for out in outs:
            record = {
                "request_id": out.request_id,
                "prompt": out.prompt,
                "prompt_token_ids": out.prompt_token_ids,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
                "time_to_first_token_s": out.metrics.time_to_first_token,
                "mean_time_between_tokens_s": out.metrics.mean_time_between_tokens,
            }
            sink.write(json.dumps(record) + "\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    return 0


def _explain(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import xy_inductor

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    if args.prompt:
        input_ids = AutoTokenizer.from_pretrained(args.model)(args.prompt, return_tensors="pt")["input_ids"]
    else:
        input_ids = torch.randint(0, model.config.vocab_size, (1, args.num_tokens))
    print(xy_inductor.explain(model, input_ids))  # resolved lazily: the lead's explain module
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xyserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate for a batch of prompts, JSON lines out")
    gen.add_argument("--model", required=True, help="local checkpoint folder")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line, or JSON lines")
    gen.add_argument("--token-ids", action="store_true", help="prompts are space-separated token ids")
    gen.add_argument("--output", "-o", help="JSONL output file (default stdout)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    gen.add_argument("--device")
    gen.add_argument("--dtype", help="torch dtype name to load the checkpoint in, e.g. bfloat16")
    for name in ("max-num-batched-tokens", "max-num-seqs", "max-model-len", "block-size", "num-kv-blocks"):
        gen.add_argument(f"--{name}", type=int)
    spec = gen.add_mutually_exclusive_group()
    spec.add_argument("--ngram", action="store_true", help="speculative decoding with n-gram prompt lookup")
    spec.add_argument("--draft-model", help="speculative decoding with this draft checkpoint folder")
    gen.add_argument("--num-speculative-tokens", type=int, default=4, help="drafted tokens per step (k)")
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    gen.set_defaults(func=_generate)
    exp = sub.add_parser("explain", help="what the xyserve backend lowers in a model, and what it leaves")
    exp.add_argument("--model", required=True, help="local checkpoint folder")
    exp.add_argument("--prompt", help="text to trace with (needs a tokenizer in the folder)")
    exp.add_argument("--num-tokens", type=int, default=16, help="random prompt length without --prompt")
    exp.set_defaults(func=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
