"""Plain dataclasses passed between engine parts: the Token-Table of a step and request outputs."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from xy_inductor.engine.request import RequestMetrics


class Stage(enum.Enum):
    PREFILL = "prefill"  # prompt tokens (a whole prompt or one chunk of it), or a recompute
    DECODE = "decode"  # the one token sampled last step
    VERIFY = "verify"  # the last sampled token plus drafted tokens (speculative decoding)


@dataclass(slots=True)
class ScheduledRequest:
    """One Token-Table row: what one request computes this step.

    The new tokens sit at positions num_computed_tokens .. num_computed_tokens + len(token_ids) - 1
    and attend to every earlier position of the same request (the KV length is `seq_len`).
    """

    request_id: str
    stage: Stage
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    slot_mapping: list[int]
    sample: bool  # logits wanted at the last new token (the step reaches the request's last known token)
    num_draft_tokens: int = 0  # trailing drafted tokens to verify (VERIFY rows)
    # DECODE rows only: decode steps run back to back on the device (a burst), each feeding its token
    # to the next; the row computes the KV of positions num_computed_tokens .. + num_steps - 1
    num_steps: int = 1

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Positions whose KV the row writes: its new tokens, and a burst's later steps' inputs."""
        return len(self.token_ids) + self.num_steps - 1

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.num_computed_tokens, self.seq_len)


@dataclass(slots=True)
class SchedulerOutput:
    """The Token-Table of one step: decode / verify rows first, then prefill rows."""

    rows: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)

    def count(self, stage: Stage) -> int:
        return sum(1 for r in self.rows if r.stage is stage)

    @property
    def empty(self) -> bool:
        return not self.rows


@dataclass(slots=True)
class RequestOutput:
    """What a caller sees of one request: cumulative tokens and text, plus what is new since last time."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    metrics: RequestMetrics
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return self.metrics.time_to_first_token

    @property
    def time_between_tokens(self) -> list[float]:
        return self.metrics.time_between_tokens
