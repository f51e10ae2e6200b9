"""Request: one prompt's token bookkeeping as it moves through the scheduler.

A request's tokens are prompt + generated (+ drafted, once speculative decoding lands). Each step
the scheduler lets it compute some of the tokens it has not computed yet; when the step computes
its last known token, the logits there sample the next token. Nothing here touches tensors.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from xy_inductor.config import SamplingParams

# An output token the device has sampled but the host has not read yet (overlapped steps): the
# next step's input at its position is copied on the device, see overlap.py.
PENDING = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to recompute from its prefix-cache hits
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of one request."""

    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first schedule)
    num_preemptions: int = 0
    num_draft_tokens: int = 0  # speculative tokens proposed for this request
    num_accepted_tokens: int = 0  # of which the target accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def time_between_tokens(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def mean_time_between_tokens(self) -> float | None:
        gaps = self.time_between_tokens
        return sum(gaps) / len(gaps) if gaps else None


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None
    prompt: str | None = None
    arrival_index: int = 0  # admission order: the newest running request is preempted first
    output_token_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[int] = field(default_factory=list)  # proposed, not yet verified
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # Set by the engine, read by nobody in the scheduler: sampler state lives with the request.
    generator: object | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV must exist before the next token can be sampled: prompt + generated
        + drafted (the drafts' KV is computed by the verify step that checks them)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.draft_token_ids)

    @property
    def num_committed_tokens(self) -> int:
        """Prompt + generated: the tokens that stay, whatever the verifier says of the drafts."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_id(self, index: int) -> int:
        return self.token_ids(index, index + 1)[0]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + generated + drafted."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        tail = self.output_token_ids + self.draft_token_ids if self.draft_token_ids else self.output_token_ids
        if start >= n:
            return tail[start - n : end - n]
        return self.prompt_token_ids[start:] + tail[: end - n]

    def all_token_ids(self) -> list[int]:
        """Prompt + generated (what a drafter continues)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.token_times.append(now)

    def truncate_output(self, num_tokens: int) -> None:
        """Keep the first num_tokens generated tokens (a stop string ended the output there)."""
        del self.output_token_ids[num_tokens:]
        del self.metrics.token_times[num_tokens:]

    def drop_pending(self) -> int:
        """Remove the trailing PENDING placeholders (the host has read their tokens); how many."""
        n = 0
        while self.output_token_ids and self.output_token_ids[-1] == PENDING:
            self.output_token_ids.pop()
            n += 1
        return n

    @property
    def num_known_tokens(self) -> int:
        """Prompt + generated tokens up to the first PENDING one (the host knows their ids)."""
        n = self.num_committed_tokens
        while n > self.num_prompt_tokens and self.output_token_ids[n - self.num_prompt_tokens - 1] == PENDING:
            n -= 1
        return n

    @property
    def has_pending(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING

    @property
    def at_limit(self) -> bool:
        """Its pending token reaches max_tokens or max_model_len: nothing more to schedule; it
        finishes once that token is read. (Without a pending token a request at max_model_len is
        a prompt of exactly that length, which still has to be prefilled.)"""
        if not self.has_pending:
            return False
        if self.num_output_tokens >= self.sampling_params.max_tokens:
            return True
        return self.max_model_len is not None and self.num_committed_tokens >= self.max_model_len

    def check_stop(self) -> RequestStatus | None:
        """The finish status implied by the last appended token, or None to keep going."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and self.num_committed_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
