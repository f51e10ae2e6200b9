"""Scheduler: fill one token budget per step with decode, verify and prefill tokens; no phases.

Every running request catches its computed tokens up to its known tokens (prompt + generated,
later + drafted). Requests that only need their last sampled token (decode, or verify with drafts)
go first and always get room in the budget; running prefills (chunks of long prompts, recomputes)
and then waiting requests fill what is left. When the KV pool runs dry the newest running request
is preempted: its blocks are freed and it recomputes later (mostly from prefix-cache hits), so the
oldest request always makes progress and every request finishes. Works on lists, never tensors.
"""
from __future__ import annotations

import time
from collections import deque

from xy_inductor.engine.kv_cache import KVCacheManager
from xy_inductor.engine.outputs import ScheduledRequest, SchedulerOutput, Stage
from xy_inductor.engine.request import PENDING, Request, RequestStatus


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("xyserve: the token budget must cover one decode token per running request")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._next_arrival = 0
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # speculative tokens verified, all requests
        self.num_accepted_tokens = 0

    # ------------------------------------------------------------ requests in and out
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"xyserve: request id {request.request_id!r} is already in use")
        request.arrival_index = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish a request early (abort, stop string found by the engine) or normally."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.metrics.finished_time = time.perf_counter()
        self.kv.remove(request)
        return request

    # ------------------------------------------------------------ one step
    def schedule(self, max_steps: int = 1) -> SchedulerOutput:
        """The next step's rows. With max_steps > 1 a step whose rows are every running request, each a
        greedy decode, may become a burst of up to max_steps decode steps (ScheduledRequest.num_steps, the
        same for every row; the engine asks only when the device can feed each token to the next step
        itself, for as many rows as its kernel takes)."""
        out = SchedulerOutput()
        rows: dict[str, ScheduledRequest] = {}
        budget = self.max_num_batched_tokens
        # Decode / verify rows first (they need only their last token), then running prefills.
        order = sorted(self.running, key=lambda r: (not self.is_decoding(r), r.arrival_index))
        for request in order:
            if request.status is not RequestStatus.RUNNING or budget == 0 or request.at_limit:
                continue  # at_limit: only with overlapped steps, done once its pending token is read
            if request.draft_token_ids:
                self._fit_drafts(request, budget)
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            fits, freed = self._make_room(request, n, rows, out)
            budget += freed  # rows of preempted requests give their tokens back
            if fits:
                rows[request.request_id] = self._row(request, n)
                budget -= n
        if not out.preempted_ids:  # admitting while preempting would only thrash the pool
            budget = self._admit_waiting(rows, budget)
        if max_steps > 1 and rows and len(rows) == len(self.running) and not self.waiting:
            self._burst(rows, max_steps)
        out.rows = list(rows.values())
        return out

    def _burst(self, rows: dict[str, ScheduledRequest], max_steps: int) -> None:
        """Turn the rows, when each decodes a greedy request, into a burst: a power of two of steps for
        all of them (one CUDA graph per size), within every request's max_tokens / max_model_len and the
        KV pool. A row the pool cannot take leaves the step unburst (blocks given to the rows before it
        serve their next steps)."""
        requests = [self.requests[rid] for rid in rows]
        if any(row.stage is not Stage.DECODE or not r.sampling_params.argmax_only
               for row, r in zip(rows.values(), requests)):
            return
        room = max_steps
        for request in requests:
            room = min(room, request.sampling_params.max_tokens - request.num_output_tokens)
            if request.max_model_len is not None:
                room = min(room, request.max_model_len - request.num_committed_tokens)
        n = 1 << (room.bit_length() - 1) if room > 1 else 1
        if n > 1 and all(self.kv.allocate_slots(request, n) for request in requests):
            for request in requests:
                rows[request.request_id] = self._row(request, 1, num_steps=n)

    @staticmethod
    def is_decoding(request: Request) -> bool:
        """Only its last sampled token (and any drafts after it) is left to compute."""
        return request.num_output_tokens > 0 and request.num_committed_tokens - request.num_computed_tokens == 1

    def _fit_drafts(self, request: Request, budget: int) -> None:
        """Drop trailing drafts that the budget or the KV pool cannot take this step: a verify row
        is all or nothing (it needs the logits of every drafted position), and drafts are never
        worth preempting another request for."""
        keep = max(0, budget - 1)
        while request.draft_token_ids and (
            len(request.draft_token_ids) > keep or not self.kv.can_allocate(request, 1 + len(request.draft_token_ids))
        ):
            request.draft_token_ids.pop()

    def _make_room(self, request: Request, n: int, rows: dict, out: SchedulerOutput) -> tuple[bool, int]:
        """Allocate KV for n new tokens, preempting the newest running requests as needed; whether it
        fits, and the tokens of the preempted requests' rows dropped from this step."""
        freed = 0
        while not self.kv.allocate_slots(request, n):
            victim = max(self.running, key=lambda r: r.arrival_index)
            self._preempt(victim)
            row = rows.pop(victim.request_id, None)
            freed += row.num_new_tokens if row is not None else 0
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return False, freed
        return True, freed

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.draft_token_ids.clear()
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, rows: dict, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.find_cached_prefix(request)
            num_hit = len(hits) * self.kv.block_size
            n = min(request.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(request, n, hits):
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            first_time = request.metrics.first_scheduled_time is None
            if first_time:
                request.metrics.first_scheduled_time = time.perf_counter()
                request.metrics.num_cached_tokens = num_hit
            self.kv.record_prefix_lookup(request.num_tokens if first_time else 0, num_hit)
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            rows[request.request_id] = self._row(request, n)
            budget -= n
        return budget

    def _row(self, request: Request, n: int, num_steps: int = 1) -> ScheduledRequest:
        start = request.num_computed_tokens
        table = self.kv.block_table(request.request_id)
        bs = self.kv.block_size
        decode = self.is_decoding(request)
        drafts = len(request.draft_token_ids) if decode else 0
        return ScheduledRequest(
            request_id=request.request_id,
            stage=(Stage.VERIFY if drafts else Stage.DECODE) if decode else Stage.PREFILL,
            token_ids=request.token_ids(start, start + n),
            num_computed_tokens=start,
            block_table=table,
            slot_mapping=[table[p // bs] * bs + p % bs for p in range(start, start + n)],
            sample=start + n == request.num_tokens,
            num_draft_tokens=drafts,
            num_steps=num_steps,
        )

    # ------------------------------------------------------------ after the forward
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish stopped requests.

        Returns the requests that got new tokens (finished ones included)."""
        now = time.perf_counter()
        changed = []
        for row in out.rows:
            request = self.requests.get(row.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            tokens = sampled.get(row.request_id, []) if row.sample else []
            if row.num_draft_tokens:
                self._settle_drafts(request, row, len(tokens) - 1)
            else:
                request.num_computed_tokens += row.num_kv_tokens
            self.kv.cache_full_blocks(request)
            if not row.sample:
                continue
            _, status = self._append(request, tokens, now)
            if status is not None:
                self.finish(request.request_id, status)
            changed.append(request)
        return changed

    @staticmethod
    def _append(request: Request, tokens: list[int], now: float) -> tuple[int, RequestStatus | None]:
        """Append sampled tokens up to the first that stops the request (the rest are dropped); how
        many were appended, and the stop status (None: keep going). The caller finishes it."""
        for n, token_id in enumerate(tokens, start=1):
            request.append_token(token_id, now)
            status = request.check_stop()
            if status is not None:
                return n, status
        return len(tokens), None

    # ------------------------------------------------------------ overlapped steps (overlap.py)
    def advance(self, out: SchedulerOutput) -> None:
        """Right after a step is launched, before its tokens are known: advance computed tokens
        and give each sampling row a PENDING token (a burst one per step), so the next step can be
        scheduled at once. No drafts: a verify row's computed count depends on its verdict."""
        for row in out.rows:
            request = self.requests.get(row.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # finished (or aborted) since it was scheduled: its row is wasted work
            if row.num_draft_tokens:
                raise RuntimeError("xyserve: verify rows cannot run overlapped")
            request.num_computed_tokens += row.num_kv_tokens
            self.kv.cache_full_blocks(request)
            if row.sample:
                request.output_token_ids.extend([PENDING] * row.num_steps)

    def resolve(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[tuple[Request, int]]:
        """The advanced step's tokens are known: fill the PENDING tokens (a burst's in order, up to a
        stop: the rest are dropped), finish stopped requests. Returns each changed request with its
        number of new tokens. A request preempted since keeps its tokens (sampled from a complete KV)."""
        now = time.perf_counter()
        changed = []
        for row in out.rows:
            request = self.requests.get(row.request_id)
            if not row.sample or request is None or not request.has_pending:
                continue  # aborted, or finished before this step was advanced
            tokens = sampled[row.request_id]
            if request.drop_pending() != len(tokens):
                raise RuntimeError(f"xyserve: request {row.request_id!r} got {len(tokens)} tokens for its "
                                   "pending ones")
            num_new, status = self._append(request, tokens, now)
            self.kv.cache_full_blocks(request)  # a burst's blocks, now that their tokens are known
            if status is not None:
                self.finish(request.request_id, status)
            changed.append((request, num_new))
        return changed

    def _settle_drafts(self, request: Request, row: ScheduledRequest, num_accepted: int) -> None:
        """After a verify row: keep the KV of the last token and the accepted drafts, roll back the
        rest (their slots are freed or overwritten later), and drop the drafts: the accepted ones
        come back as sampled tokens."""
        request.num_computed_tokens = row.num_computed_tokens + 1 + num_accepted
        request.metrics.num_draft_tokens += row.num_draft_tokens
        request.metrics.num_accepted_tokens += num_accepted
        self.num_draft_tokens += row.num_draft_tokens
        self.num_accepted_tokens += num_accepted
        request.draft_token_ids.clear()
        self.kv.truncate(request)
