"""Verifier: accept or reject a request's drafted tokens from the target's logits of one step.

A verify row of k drafted tokens d_0..d_{k-1} brings k + 1 logits rows from the target: row i is
the target's distribution for the token after (prompt + output + d_0..d_{i-1}).

    greedy:   accept the longest prefix with d_i == argmax(row i), then add argmax of the first
              row that disagreed (or of row k when all were accepted): 1..k+1 new tokens.
    sampled:  standard speculative rejection sampling: accept d_i with probability
              min(1, p_i(d_i) / q_i(d_i)); on the first rejection draw from norm(max(0, p_i - q_i));
              when all are accepted draw the bonus token from p_k. The output distribution is the
              target's, whatever the draft (q is a point mass for the n-gram drafter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from xy_inductor.config import SamplingParams
from xy_inductor.engine.sampler import apply_repetition_penalty, argmax_rows, filter_top_k_top_p


@dataclass(slots=True)
class Verdict:
    token_ids: list[int]  # accepted drafts + one token from the target
    num_accepted: int  # drafted tokens accepted (0..k)


def target_probs(logits: torch.Tensor, params: SamplingParams, seen: list[int] | None) -> torch.Tensor:
    """The distribution the sampler would draw from for one logits row [V] (float32)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return logits.softmax(dim=-1)


def verify_greedy(logits: torch.Tensor, draft_ids: list[int], best: list[int] | None = None) -> Verdict:
    """logits [k + 1, V] for k drafted tokens; `best`: their argmax per row when already known."""
    if best is None:
        best = argmax_rows(logits).tolist()
    elif len(best) != len(draft_ids) + 1:
        raise ValueError(f"xyserve: {len(best)} argmax rows for {len(draft_ids)} drafted tokens")
    n = 0
    while n < len(draft_ids) and draft_ids[n] == best[n]:
        n += 1
    return Verdict(list(draft_ids[:n]) + [best[n]], n)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _uniform(generator: torch.Generator | None) -> float:
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand((), generator=generator, device=device))


def verify_sampled(
    logits: torch.Tensor,  # [k + 1, V]
    draft_ids: list[int],
    draft_probs: torch.Tensor | None,  # [k, V] the draft's distributions; None = point masses (n-gram)
    params: SamplingParams,
    seen: list[int] | None,
    generator: torch.Generator | None,
) -> Verdict:
    seen = list(seen or [])
    out: list[int] = []
    for i, token in enumerate(draft_ids):
        p = target_probs(logits[i], params, seen)
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[i].float().to(p.device)
        accept = min(1.0, float(p[token]) / max(float(q[token]), 1e-30))
        if _uniform(generator) < accept:
            out.append(token)
            seen.append(token)
            continue
        residual = (p - q).clamp_min(0)
        total = float(residual.sum())
        out.append(_draw(residual / total, generator) if total > 0 else _draw(p, generator))
        return Verdict(out, i)
    out.append(_draw(target_probs(logits[len(draft_ids)], params, seen), generator))
    return Verdict(out, len(draft_ids))
