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
import logging

import torch

from xy_inductor.config import EngineConfig, SamplingParams
from xy_inductor.engine.drafters import make_drafter
from xy_inductor.engine.kv_cache import KVCacheManager
from xy_inductor.engine.model_runner import ModelRunner
from xy_inductor.engine.outputs import RequestOutput, SchedulerOutput
from xy_inductor.engine.overlap import InflightStep, TokenFeed
from xy_inductor.engine.paged_drafter import PagedDraftDrafter
from xy_inductor.engine.request import Request, RequestStatus
from xy_inductor.engine.request_checks import check_request, encode_prompt
from xy_inductor.engine.sampler import Sampler, SamplingRow
from xy_inductor.engine.scheduler import Scheduler
from xy_inductor.engine.text_output import TextOutput
from xy_inductor.engine.step_sampling import sample_in_order

log = logging.getLogger("xyserve")


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
        self.drafter = make_drafter(config.speculative, model, config, self.max_model_len, budget)
        overlap = config.async_scheduling
        self.async_scheduling = overlap if overlap is not None else self.device.type == "cuda"
        self.feed = TokenFeed(self.runner.max_keep, self.device)
        self._inflight: InflightStep | None = None
        self.num_overlapped_steps = 0

    # ------------------------------------------------------------ requests
    def make_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        if self.runner.packed is not None:
            self.runner.packed.check()  # a swapped weight would be read at its old address
        text, token_ids = encode_prompt(prompt, self.tokenizer)
        check_request(token_ids, params, self.max_model_len, self.vocab_size, self.tokenizer)
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
        self.text.drop(request_id)
        if self.drafter is not None:
            self.drafter.release(request_id)  # an aborted request gets no last output to release it

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ one step
    def step(self, stream_text: bool = False) -> list[RequestOutput]:
        """Schedule, run and sample (or verify) one step; outputs of the requests that got tokens.
        Overlapped (async_scheduling), the outputs are those of the step launched by the last call."""
        if self._can_overlap():
            return self._step_overlapped(stream_text)
        previous, self._inflight = self._inflight, None
        try:
            outputs = self._resolve(stream_text, previous)  # the host needs every token from here on
        except BaseException:
            self._abort_rows(previous, SchedulerOutput())  # its tokens are lost: see _step_overlapped
            raise
        if self.drafter is not None:
            self._propose_drafts()
        out = self.scheduler.schedule()
        if out.empty:
            if self.scheduler.has_unfinished() and not outputs:
                raise RuntimeError("xyserve: the scheduler found no work for unfinished requests")
            return outputs
        before = {r.request_id: self._num_output(r.request_id) for r in out.rows}
        logits, sample_ids = self.runner.execute(out)
        sampled = self._sample(out, logits, sample_ids)
        changed = self.scheduler.update_from_output(out, sampled)
        self.num_steps += 1
        return outputs + [self._output(r, stream_text, r.num_output_tokens - before[r.request_id]) for r in changed]

    # ------------------------------------------------------------ overlapped steps (overlap.py)
    def _can_overlap(self) -> bool:
        if not self.async_scheduling or self.drafter is not None:
            return False
        return all(r.sampling_params.repetition_penalty == 1.0 for r in self.scheduler.requests.values())

    def _step_overlapped(self, stream_text: bool) -> list[RequestOutput]:
        """Launch the next step, then read the tokens of the one in flight (see overlap.py)."""
        previous, self._inflight = self._inflight, None
        out, launched = SchedulerOutput(), None
        try:
            out = self.scheduler.schedule(self._max_steps())
            if not out.empty:
                launched = self._launch(out, previous)
            outputs = self._resolve(stream_text, previous)
        except BaseException:
            # The two steps' bookkeeping is half done (a token read or not, a step launched but
            # not advanced): their requests cannot go on exactly, so they end as aborted.
            self._abort_rows(previous, out)
            raise
        if launched is not None:
            self.scheduler.advance(out)
            self._inflight = launched
            self.num_steps += 1
            self.num_overlapped_steps += 1
        elif previous is None and self.scheduler.has_unfinished():
            raise RuntimeError("xyserve: the scheduler found no work for unfinished requests")
        return outputs

    def _max_steps(self) -> int:
        """Decode steps greedy requests may run per engine step: a burst needs the whole-step kernel (it
        feeds each token to the next launch), one step of it that ran, and a kernel whose bursts take
        every running request (`burst_rows`: 1, or the rows of a multi-row kernel whose launches loop)."""
        path = self.runner.decode_path
        if path is None or path.num_steps == 0 or len(self.scheduler.running) > path.burst_rows:
            return 1
        return self.config.decode_burst

    def _abort_rows(self, previous: InflightStep | None, out: SchedulerOutput) -> None:
        rows = (previous.out.rows if previous is not None else []) + out.rows
        ids = [rid for rid in dict.fromkeys(r.request_id for r in rows) if rid in self.scheduler.requests]
        log.error("xyserve: a step failed while another was in flight; aborting their requests %s", ids)
        for rid in ids:
            self.abort_request(rid)

    def _launch(self, out: SchedulerOutput, previous: InflightStep | None) -> InflightStep:
        feed = None
        dst, ids = self.feed.pending_rows(out)
        if dst:  # decode rows whose input is a token of the step in flight
            index = previous.index()
            src = [index[rid] for rid in ids]
            feed = lambda input_ids: self.feed.feed(input_ids, dst, src, previous.tokens)
        logits, sample_ids = self.runner.execute(out, feed)
        picked = self.runner.picked_tokens
        if picked is not None:  # a decode burst: the kernel picked its tokens on the device
            return self.feed.launch(out, sample_ids * (picked.numel() // len(sample_ids)), picked)  # step-major
        requests = self.scheduler.requests
        rows = [SamplingRow(requests[rid].sampling_params, None, requests[rid].generator) for rid in sample_ids]
        tokens = (self.sampler.sample_tensor(logits, rows, self.runner.last_argmax) if rows
                  else torch.empty(0, dtype=torch.long, device=self.device))
        return self.feed.launch(out, sample_ids, tokens)

    def _resolve(self, stream_text: bool, step: InflightStep | None) -> list[RequestOutput]:
        """Read a launched step's tokens and return its outputs."""
        if step is None:
            return []
        changed = self.scheduler.resolve(step.out, step.wait())
        return [self._output(r, stream_text, num_new) for r, num_new in changed]

    def _num_output(self, request_id: str) -> int:
        return self.scheduler.requests[request_id].num_output_tokens

    def _propose_drafts(self) -> None:
        """Give every decoding request up to k drafted tokens (never past its max_tokens / length)."""
        wanted: list[tuple[Request, int]] = []
        for request in self.scheduler.running:
            if request.draft_token_ids or not self.scheduler.is_decoding(request):
                continue
            room = min(
                request.sampling_params.max_tokens - request.num_output_tokens,
                self.max_model_len - request.num_committed_tokens,
            ) - 1  # the verify step always adds one token of the target's own
            if room > 0:
                wanted.append((request, room))
        if isinstance(self.drafter, PagedDraftDrafter):  # one batched draft pass for all of them
            drafts = self.drafter.propose_batch([(r.request_id, r.all_token_ids(), room) for r, room in wanted])
            for request, _ in wanted:
                request.draft_token_ids = drafts.get(request.request_id, [])
            return
        for request, room in wanted:
            request.draft_token_ids = self.drafter.propose(request.request_id, request.all_token_ids(), room)

    def _sample(self, out, logits: torch.Tensor, sample_ids: list[str]) -> dict[str, list[int]]:
        """An in-order step's tokens per request (step_sampling.py)."""
        return sample_in_order(out, logits, sample_ids, self.scheduler.requests, self.sampler, self.runner.last_argmax)

    def _output(self, request: Request, stream_text: bool, num_new: int = 1) -> RequestOutput:
        params = request.sampling_params
        text = new_text = None
        if self.tokenizer is not None and (stream_text or params.stop or request.finished):
            text, new_text, hit = self.text.update(request)
            if hit and num_new > 1:  # accepted drafts past the stop string are not output
                keep = self.text.first_stop(request, num_new)
                if keep is not None and keep < request.num_output_tokens:
                    num_new -= request.num_output_tokens - keep
                    request.truncate_output(keep)
            if hit and not request.finished:
                self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)
        if request.finished:
            self.text.drop(request.request_id)
            if self.drafter is not None:
                self.drafter.release(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=text,
            finished=request.finished,
            finish_reason=request.status.value if request.finished else None,
            metrics=request.metrics,
            new_token_ids=request.output_token_ids[len(request.output_token_ids) - num_new :] if num_new else [],
            new_text=new_text,
        )

    @property
    def stats(self) -> dict:
        kv = self.kv
        return {
            "steps": self.num_steps,
            "overlapped_steps": self.num_overlapped_steps,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_query_tokens": kv.num_query_tokens,
            "prefix_hit_tokens": kv.num_hit_tokens,
            "prefix_hit_blocks": kv.num_hit_blocks,
            "kv_blocks": kv.pool.num_blocks,
            "kv_free_blocks": kv.num_free_blocks,
            "spec_draft_tokens": self.scheduler.num_draft_tokens,
            "spec_accepted_tokens": self.scheduler.num_accepted_tokens,
            "spec_acceptance_rate": (self.scheduler.num_accepted_tokens / self.scheduler.num_draft_tokens
                                     if self.scheduler.num_draft_tokens else None),
        }
