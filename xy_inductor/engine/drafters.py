"""Drafters propose the next k tokens of a request; the target verifies them in the mixed batch.

Both have `propose(request_id, token_ids, max_tokens) -> drafts` and `release(request_id)`.

NgramDrafter (prompt lookup): find the most recent earlier occurrence of the sequence's last n
tokens (n from n_max down to n_min) and propose the k tokens that followed it. No model, no
tensors: it runs in the scheduler's bookkeeping time.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
from dataclasses import dataclass

import torch

from xy_inductor.config import EngineConfig, SpeculativeConfig

log = logging.getLogger("xyserve")


@dataclass(slots=True)
class NgramDrafter:
    num_speculative_tokens: int = 4
    n_min: int = 1
    n_max: int = 3

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise ValueError(f"xyserve: num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"xyserve: need 1 <= n_min <= n_max, got {self.n_min}, {self.n_max}")

    def release(self, request_id: str) -> None:
        """Nothing is kept per request."""

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Up to k drafted tokens continuing `token_ids` (empty when no n-gram repeats)."""
        k = self.num_speculative_tokens if max_tokens is None else min(max_tokens, self.num_speculative_tokens)
        if k <= 0:
            return []
        size = len(token_ids)
        for n in range(min(self.n_max, size - 1), self.n_min - 1, -1):
            tail = token_ids[size - n :]
            # most recent earlier match first: recent context predicts best
            for start in range(size - n - 1, -1, -1):
                if token_ids[start : start + n] == tail:
                    follow = token_ids[start + n : start + n + k]
                    if follow:
                        return follow
        return []


class DraftModelDrafter:
    """A small HF causal LM drafts greedily, one request at a time, each request keeping its own
    KV cache (an HF DynamicCache cropped back to the verified prefix after every step). The fallback
    for draft models the paged runner cannot serve (paged_drafter.py is the batched, fast path).

    A greedy draft is a deterministic proposal, i.e. a point-mass q, which the verifier's rejection
    sampling handles exactly; so sampled requests keep the target's distribution too.
    """

    def __init__(self, model, num_speculative_tokens: int) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"xyserve: num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.model = model.eval()
        self.num_speculative_tokens = num_speculative_tokens
        self.device = next(model.parameters()).device
        # transformers renamed `past_key_values` to `cache` (5.2x); older versions know only the former
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._caches: dict[str, tuple[object, list[int]]] = {}  # request -> (cache, tokens it holds)

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        from transformers import DynamicCache

        k = self.num_speculative_tokens if max_tokens is None else min(max_tokens, self.num_speculative_tokens)
        if k <= 0:
            return []
        cache, held = self._caches.get(request_id, (None, []))
        common = 0
        limit = min(len(held), len(token_ids) - 1)  # always feed one token to get logits
        while common < limit and held[common] == token_ids[common]:
            common += 1
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        elif common < len(held):
            cache.crop(common - len(held))  # negative = drop that many (the form every version takes)
        ids = torch.tensor([token_ids[common:]], device=self.device)
        drafts: list[int] = []
        with torch.inference_mode():
            for _ in range(k):
                logits = self.model(input_ids=ids, use_cache=True, **{self._cache_kwarg: cache}).logits
                drafts.append(int(logits[0, -1].argmax()))
                ids = torch.tensor([[drafts[-1]]], device=self.device)
        self._caches[request_id] = (cache, token_ids + drafts[:-1])  # the last draft was never fed
        return drafts

    def release(self, request_id: str) -> None:
        self._caches.pop(request_id, None)


def make_drafter(spec: SpeculativeConfig | None, target: torch.nn.Module, config: EngineConfig,
                 max_model_len: int, budget: int):
    """The drafter of a speculative config (None: no speculative decoding). A draft model runs in a
    ModelRunner of its own (paged KV, batched over requests); one the paged kernels cannot serve
    falls back, with a warning, to HF's own cache path one request at a time."""
    if spec is None:
        return None
    if spec.method == "ngram":
        return NgramDrafter(spec.num_speculative_tokens, spec.ngram_min, spec.ngram_max)
    draft = _draft_model(spec, target)
    from xy_inductor.engine.paged_drafter import (
        PagedDraftDrafter,  # it imports the runner
    )

    try:
        return PagedDraftDrafter(draft, spec.num_speculative_tokens, config, max_model_len, budget)
    except (NotImplementedError, ValueError) as e:
        log.warning("xyserve: the draft model runs through HF's cache, one request at a time (%s)", e)
    draft.set_attn_implementation("sdpa")
    return DraftModelDrafter(draft, spec.num_speculative_tokens)


def _draft_model(spec: SpeculativeConfig, target: torch.nn.Module) -> torch.nn.Module:
    draft = spec.draft_model
    if isinstance(draft, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        draft = AutoModelForCausalLM.from_pretrained(os.fspath(draft), dtype=next(target.parameters()).dtype)
        draft = draft.to(next(target.parameters()).device)
    if draft is target:
        # The target's runner owns its module (attention, compiled forward, packed weights): the
        # draft runs a copy of it (same weights).
        draft = copy.deepcopy(target)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("xyserve: the draft model's vocabulary differs from the target's")
    return draft
