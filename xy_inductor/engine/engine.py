"""LLMEngine: requests in, one scheduled + executed + sampled step per `step()`, outputs out.

    engine = LLMEngine(model, tokenizer, EngineConfig(...))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step(): ...

A request with bad input is refused in `add_request` with a ValueError before it touches any
state, so requests already in flight carry on.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from xy_inductor.config import EngineConfig, SamplingParams
from xy_inductor.engine.kv_cache import KVCacheManager
from xy_inductor.engine.model_runner import ModelRunner
from xy_inductor.engine.outputs import RequestOutput
from xy_inductor.engine.request import Request, RequestStatus
from xy_inductor.engine.sampler import Sampler, SamplingRow
from xy_inductor.engine.scheduler import Scheduler
from xy_inductor.engine.text_output import TextOutput


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def default_budget(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 512


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, config)
        self.device = self.runner.device
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = _eos_ids(model, tokenizer)
        budget = config.max_num_batched_tokens or max(default_budget(self.device), config.max_num_seqs or 0)
        max_num_seqs = config.max_num_seqs or min(256, budget)
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, budget, max_num_seqs)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.text = TextOutput(tokenizer)
        self._ids = itertools.count()
        self.num_steps = 0

    # ------------------------------------------------------------ requests
    def encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("xyserve: a text prompt needs a tokenizer; pass token ids or LLM(..., tokenizer=...)")
            if not prompt:
                raise ValueError("xyserve: empty prompt")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        return None, list(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"xyserve: expected SamplingParams, got {type(params).__name__}")
        if not token_ids:
            raise ValueError("xyserve: empty prompt (no tokens)")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"xyserve: prompt of {len(token_ids)} tokens exceeds max_model_len {self.max_model_len}")
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"xyserve: token id {t!r} is not in the vocabulary [0, {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("xyserve: stop strings need a tokenizer")

    def make_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        text, token_ids = self.encode(prompt)
        self.validate(token_ids, params)
        request = Request(
            request_id=request_id if request_id is not None else str(next(self._ids)),
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            prompt=text,
        )
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return request

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> str:
        request = self.make_request(prompt, params, request_id)
        self.scheduler.add_request(request)
        return request.request_id

    def abort_request(self, request_id: str) -> None:
        self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ one step
    def step(self, stream_text: bool = False) -> list[RequestOutput]:
        """Schedule, run and sample one step; outputs of the requests that got new tokens."""
        out = self.scheduler.schedule()
        if out.empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("xyserve: the scheduler found no work for unfinished requests")
            return []
        logits, sample_ids = self.runner.execute(out)
        requests = self.scheduler.requests
        rows = [
            SamplingRow(
                params=requests[rid].sampling_params,
                seen_token_ids=self._seen(requests[rid]),
                generator=requests[rid].generator,
            )
            for rid in sample_ids
        ]
        tokens = self.sampler.sample(logits, rows) if rows else []
        changed = self.scheduler.update_from_output(out, {rid: [t] for rid, t in zip(sample_ids, tokens)})
        self.num_steps += 1
        return [self._output(r, stream_text) for r in changed]

    @staticmethod
    def _seen(request: Request) -> list[int] | None:
        if request.sampling_params.repetition_penalty == 1.0:
            return None
        return request.prompt_token_ids + request.output_token_ids

    def _output(self, request: Request, stream_text: bool) -> RequestOutput:
        params = request.sampling_params
        text = new_text = None
        if self.tokenizer is not None and (stream_text or params.stop or request.finished):
            text, new_text, hit = self.text.update(request)
            if hit and not request.finished:
                self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)
        if request.finished:
            self.text.drop(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=text,
            finished=request.finished,
            finish_reason=request.status.value if request.finished else None,
            metrics=request.metrics,
            new_token_ids=request.output_token_ids[-1:],
        )

    @property
    def stats(self) -> dict:
        kv = self.kv
        return {
            "steps": self.num_steps,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_query_tokens": kv.num_query_tokens,
            "prefix_hit_tokens": kv.num_hit_tokens,
            "prefix_hit_blocks": kv.num_hit_blocks,
            "kv_blocks": kv.pool.num_blocks,
            "kv_free_blocks": kv.num_free_blocks,
        }
