"""LLM: the public entry point of the engine.

    llm = LLM(model_or_path, tokenizer=None, max_num_batched_tokens=..., ...)   # EngineConfig fields
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    for out in llm.stream(prompts, params): print(out.request_id, out.new_token_ids)

The model is switched to attn_implementation="xyserve" (its attention then only runs inside the
engine; `model.set_attn_implementation("sdpa")` gives it back, and the engine switches it again, with a
warning, at its next step that runs the model).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

import torch

from xy_inductor.config import EngineConfig, SamplingParams
from xy_inductor.engine.engine import LLMEngine
from xy_inductor.engine.outputs import RequestOutput


def _load(path: str, config: EngineConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"xyserve: {path!r} is not a local checkpoint folder")
    dtype = getattr(torch, config.dtype) if config.dtype else "auto"
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # a folder with weights only: token-id prompts still work
        tokenizer = None
    return model, tokenizer


def _prompt_list(prompts) -> list:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return [prompts] if prompts.dim() == 1 else list(prompts)
    return list(prompts)


class LLM:
    def __init__(self, model, tokenizer=None, **engine_config) -> None:
        config = EngineConfig(**engine_config)
        if isinstance(model, (str, os.PathLike)):
            model, found = _load(os.fspath(model), config)
            tokenizer = tokenizer if tokenizer is not None else found
        elif config.device is not None:
            model = model.to(config.device)
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        self.engine = LLMEngine(model, tokenizer, config)
        self.tokenizer = tokenizer

    def _add(self, prompts, sampling_params) -> list[str]:
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"xyserve: {len(params)} SamplingParams for {len(prompts)} prompts")
        # Validate every prompt before adding any, so one bad prompt leaves the engine untouched.
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]
        for request in requests:
            self.engine.scheduler.add_request(request)
        return [r.request_id for r in requests]

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run the prompts to completion; one RequestOutput per prompt, in prompt order."""
        from tqdm.auto import tqdm

        ids = self._add(prompts, sampling_params)
        wanted, done = set(ids), {}
        start, num_tokens = time.perf_counter(), 0
        try:
            with tqdm(total=len(ids), desc="xyserve generate", unit="req", disable=not use_tqdm) as bar:
                while len(done) < len(ids):
                    for out in self.engine.step():
                        num_tokens += len(out.new_token_ids)
                        if out.finished and out.request_id in wanted:
                            done[out.request_id] = out
                            bar.update(1)
                    bar.set_postfix(tok_s=f"{num_tokens / max(time.perf_counter() - start, 1e-9):.0f}", refresh=False)
        except BaseException:
            for rid in wanted - set(done):
                self.engine.abort_request(rid)
            raise
        return [done[rid] for rid in ids]

    def stream(self, prompts, sampling_params=None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time one of the prompts gets new tokens (new_token_ids, new_text)."""
        ids = self._add(prompts, sampling_params)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step(stream_text=True):
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort_request(rid)

    @property
    def stats(self) -> dict:
        return {**self.engine.stats, **self.engine.runner.stats}  # runner: CUDA graphs, Task-Tables
