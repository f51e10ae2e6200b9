"""Sampler: next tokens from the logits rows of one step.

Greedy rows are an argmax over the whole group at once. Sampled rows apply, in HF order,
repetition penalty -> temperature -> top-k -> top-p, then draw with the request's own
torch.Generator when it has a seed (so its tokens do not depend on its batch mates), else with the
engine's shared generator.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xy_inductor.config import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    seen_token_ids: list[int] | None  # prompt + output, only needed for repetition_penalty != 1
    generator: torch.Generator | None


@functools.cache
def _chunk_for(vocab: int) -> int:
    """A divisor of the vocabulary near 2k (no ragged tail to reduce apart), or 2048. Cached: the
    search takes up to ~3k modulo tests and the sampler asks every step."""
    for step in range(1536):
        for size in (2048 + step, 2048 - step):
            if vocab % size == 0:
                return size
    return 2048


def argmax_rows(logits: torch.Tensor, chunked: bool | None = None) -> torch.Tensor:
    """logits [N, V] -> int64 [N], equal to `logits.argmax(dim=-1)`: the first maximal index,
    NaN counting as the maximum.

    torch reduces each row of a 128k vocabulary in one block (31.8 us a step for one bf16 row on
    an H100: 2% of a batch-1 decode step), so on an accelerator the rows are first cut into chunks
    reduced in parallel; the first chunk holding the row's maximum then gives the first index.
    `chunked` forces either form (default: chunks off the CPU, where one pass is the fast one).
    """
    if chunked is None:
        chunked = logits.device.type != "cpu"
    num_rows, vocab = logits.shape
    if not chunked or logits.stride(-1) != 1 or vocab < 4 * _chunk_for(vocab):
        return logits.argmax(dim=-1)
    chunk = _chunk_for(vocab)
    main = vocab // chunk * chunk
    vals, idx = logits[:, :main].reshape(num_rows, main // chunk, chunk).max(dim=-1)  # [N, C] each
    if main < vocab:  # a ragged tail is one more chunk, starting at `main`
        tail_vals, tail_idx = logits[:, main:].max(dim=-1, keepdim=True)
        vals, idx = torch.cat([vals, tail_vals], 1), torch.cat([idx, tail_idx], 1)
    best = vals.argmax(dim=-1, keepdim=True)  # [N, 1]: the first chunk with the maximum
    return (best * chunk + idx.gather(1, best)).squeeze(1)


def step_argmax(logits: torch.Tensor, argmax: torch.Tensor | None) -> torch.Tensor:
    """Every logits row's argmax: the step's own (`argmax`, computed on the device inside the step)
    when it covers these rows, else `argmax_rows`."""
    return argmax if argmax is not None and argmax.shape[0] == logits.shape[0] else argmax_rows(logits)


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """HF semantics: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits.gather(-1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, ids, picked)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask to -inf everything outside the top-k and outside the smallest set with mass >= top_p."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
        """logits [N, V] (any float dtype), one row per request to sample -> N token ids."""
        return self.sample_tensor(logits, rows).tolist()

    def sample_tensor(self, logits: torch.Tensor, rows: list[SamplingRow],
                      argmax: torch.Tensor | None = None) -> torch.Tensor:
        """Like `sample`, as an int64 tensor [N] on the logits' device, without waiting for the
        device (an overlapped step reads it one step later). `argmax` [N]: the logits' argmax when
        the step computed it already (the decode kernel and the runner's device argmax do), taken
        as is by greedy rows; when every row is greedy it is returned itself, so it must stay
        unchanged until the caller has read it."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"xyserve: {logits.shape[0]} logits rows for {len(rows)} requests")
        # every row's argmax (cheap), then the sampled rows overwritten one by one: no index
        # tensor built on the host, whose copy would wait for the device
        drawn = [i for i, row in enumerate(rows) if not row.params.argmax_only]
        if argmax is not None and not drawn:
            return argmax  # all greedy: the step's own argmax, not overwritten (no copy)
        out = argmax_rows(logits) if argmax is None else argmax.clone()
        for i in drawn:
            out[i : i + 1] = self._sample_row(logits[i].float(), rows[i])
        return out

    def _sample_row(self, logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
        """One token as a 1-element tensor (on the logits' device unless drawn on a CPU generator)."""
        params = row.params
        if params.repetition_penalty != 1.0 and row.seen_token_ids:
            logits = apply_repetition_penalty(logits, row.seen_token_ids, params.repetition_penalty)
        if params.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
        probs = logits.softmax(dim=-1)
        generator = row.generator if row.generator is not None else self.generator
        if generator is not None and generator.device != probs.device:
            probs = probs.cpu()  # a CPU generator draws on the host; tiny next to a forward
        return torch.multinomial(probs, 1, generator=generator)
