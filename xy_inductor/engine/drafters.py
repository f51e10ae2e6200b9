"""Drafters propose the next k tokens of a request; the target verifies them in the mixed batch.

NgramDrafter (prompt lookup): find the most recent earlier occurrence of the sequence's last n
tokens (n from n_max down to n_min) and propose the k tokens that followed it. No model, no
tensors: it runs in the scheduler's bookkeeping time.
"""
from __future__ import annotations

from dataclasses import dataclass


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

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
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
