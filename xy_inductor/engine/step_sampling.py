"""The tokens of an in-order step (one whose sampling needs the host: drafts to verify, or a
repetition penalty): plain rows are sampled, verify rows verified, and every greedy row (plain or
verify) reads one argmax of all the step's logits rows, taken to the host once.

    logits rows   [ a | v0 v1 v2 v3 | b | ... ]      a, b: plain rows; v: a verify row of 3 drafts
    argmax        [ . |  .  .  .  . | . | ... ]      the runner's (computed in the step on a GPU), else here
"""
from __future__ import annotations

import torch

from xy_inductor.engine.outputs import SchedulerOutput
from xy_inductor.engine.request import Request
from xy_inductor.engine.sampler import Sampler, SamplingRow, step_argmax
from xy_inductor.engine.verifier import verify_greedy, verify_sampled


def seen_tokens(request: Request) -> list[int] | None:
    """Prompt + output, which a repetition penalty needs (None without one)."""
    if request.sampling_params.repetition_penalty == 1.0:
        return None
    return request.prompt_token_ids + request.output_token_ids


def sample_in_order(out: SchedulerOutput, logits: torch.Tensor, sample_ids: list[str], requests: dict[str, Request],
                    sampler: Sampler, argmax: torch.Tensor | None) -> dict[str, list[int]]:
    """Tokens per request: one for a plain row, the verifier's verdict for a verify row. `argmax`:
    the step's own argmax of every logits row, when the runner computed it."""
    drafts = {r.request_id: r.token_ids[1:] for r in out.rows if r.num_draft_tokens}
    offsets, offset = [], 0
    for rid in sample_ids:
        offsets.append(offset)
        offset += len(drafts.get(rid, ())) + 1
    greedy = {rid for rid in sample_ids if requests[rid].sampling_params.argmax_only}
    best = step_argmax(logits, argmax).tolist() if greedy else None
    drawn = [i for i, rid in enumerate(sample_ids) if rid not in drafts and rid not in greedy]
    rows = [SamplingRow(requests[sample_ids[i]].sampling_params, seen_tokens(requests[sample_ids[i]]),
                        requests[sample_ids[i]].generator) for i in drawn]
    tokens = sampler.sample(logits[[offsets[i] for i in drawn]], rows) if rows else []
    sampled = {sample_ids[i]: [t] for i, t in zip(drawn, tokens)}
    for i, rid in enumerate(sample_ids):
        lo = offsets[i]
        if rid in drafts:
            d = drafts[rid]
            row_best = best[lo : lo + len(d) + 1] if best is not None else None
            sampled[rid] = _verify(requests[rid], logits[lo : lo + len(d) + 1], d, row_best, sampler)
        elif rid not in sampled:  # a greedy plain row
            sampled[rid] = [best[lo]]
    return sampled


def _verify(request: Request, logits: torch.Tensor, drafts: list[int], best: list[int] | None,
            sampler: Sampler) -> list[int]:
    if request.sampling_params.argmax_only:
        return verify_greedy(logits, drafts, best).token_ids
    generator = request.generator if request.generator is not None else sampler.generator
    return verify_sampled(logits, drafts, None, request.sampling_params, seen_tokens(request), generator).token_ids
