"""A request's prompt turned into token ids, and its input checked before it touches any state."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from xy_inductor.config import SamplingParams


def encode_prompt(prompt: str | Sequence[int] | torch.Tensor, tokenizer) -> tuple[str | None, list[int]]:
    """(the text prompt or None, its token ids)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("xyserve: a text prompt needs a tokenizer; pass token ids or LLM(..., tokenizer=...)")
        if not prompt:
            raise ValueError("xyserve: empty prompt")
        return prompt, list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.flatten().tolist()
    return None, list(prompt)


def check_request(token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int,
                  tokenizer) -> None:
    """Raise a ValueError naming the first problem of a request's input."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"xyserve: expected SamplingParams, got {type(params).__name__}")
    if not token_ids:
        raise ValueError("xyserve: empty prompt (no tokens)")
    if len(token_ids) > max_model_len:
        raise ValueError(f"xyserve: prompt of {len(token_ids)} tokens exceeds max_model_len {max_model_len}")
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"xyserve: token id {t!r} is not in the vocabulary [0, {vocab_size})")
    if params.stop and tokenizer is None:
        raise ValueError("xyserve: stop strings need a tokenizer")
