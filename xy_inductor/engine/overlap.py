"""Overlapped steps: schedule and launch step N+1 while the device still runs step N.

One `LLMEngine.step()` with overlap keeps one step in flight:

    host:    schedule N+1 | pack, launch N+1 | wait for N's tokens | resolve N, outputs | advance N+1
    device:  ....... step N: forward + sample ....... | step N+1: feed, forward + sample ...

Step N+1 is scheduled before the host knows step N's tokens: `Scheduler.advance` gave each
sampling row of step N a PENDING placeholder token, so N+1 holds a decode row `[PENDING]` for it.
Before N+1's forward, `TokenFeed` copies the token on the device, from step N's sampled-token
tensor into N+1's input ids (stream order makes it run after step N's sampler):

    step N tokens (device)   [ t0  t1  t2 ]        src = index of the request in step N
                                    |    \\
    step N+1 input_ids      [ P  .  P  .  .  P ]   dst = packed row of the PENDING token

The host reads step N's tokens one step late (a pinned copy and an event), so a request that
stops at step N (EOS, a stop token or string) has one extra token computed in step N+1; it is
dropped. A decode burst (ScheduledRequest.num_steps, the whole-step kernel feeding each token to
its next launch) is one step here with num_steps PENDING tokens; the next step's input is its last.
Steps run overlapped only when every running request can be sampled without its history on the
host (no drafts, no repetition penalty); otherwise the engine steps in order.

Greedy and seeded requests get exactly the tokens of in-order steps. A sampled request without a
seed draws from the engine's shared generator, and so does the dropped row of a request that just
stopped: later draws shift, so such tokens differ from in-order steps, not their distribution. If
a step fails while another is in flight, the requests of both are aborted (their bookkeeping is
half done) and the error is raised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xy_inductor.engine.outputs import SchedulerOutput
from xy_inductor.engine.request import PENDING


@dataclass(slots=True)
class InflightStep:
    """A launched step whose sampled tokens the host has not read yet."""

    out: SchedulerOutput
    sample_ids: list[str]  # request id of each sampled token, in order (a burst's: one per step)
    tokens: torch.Tensor  # [N] int64 on the device: the sampled tokens
    host: torch.Tensor  # [>= N] int64, pinned on CUDA: their copy, valid once `ready` is
    ready: torch.cuda.Event | None

    def index(self) -> dict[str, int]:
        """Request id -> index of its last token (the next step's input)."""
        return {rid: i for i, rid in enumerate(self.sample_ids)}

    def wait(self) -> dict[str, list[int]]:
        """Block until the tokens are on the host; request id -> its token ids, in order."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens: dict[str, list[int]] = {}
        for rid, token_id in zip(self.sample_ids, self.host[: len(self.sample_ids)].tolist()):
            tokens.setdefault(rid, []).append(token_id)
        return tokens


class TokenFeed:
    """Device-side copies of the last step's sampled tokens into the next step's input ids, and
    the host buffers for reading sampled tokens back without blocking."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.capacity = capacity
        # [dst rows | src indices]: one pinned buffer, one copy per step
        self._index_host = torch.empty(2 * capacity, dtype=torch.int64, pin_memory=cuda)
        self._index = self._index_host.to(device) if cuda else self._index_host
        self._copied = torch.cuda.Event() if cuda else None
        # two token read-back buffers: step N+1 writes one while the host reads step N's
        self._readback = [torch.empty(capacity, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._turn = 0

    @staticmethod
    def pending_rows(out: SchedulerOutput) -> tuple[list[int], list[str]]:
        """Packed row and request id of every PENDING input token of a step. Only a decode row
        holds one (its last sampled token), so it is the row's only token."""
        rows, ids, offset = [], [], 0
        for row in out.rows:
            if row.token_ids[-1] == PENDING:
                rows.append(offset + len(row.token_ids) - 1)
                ids.append(row.request_id)
            offset += len(row.token_ids)
        return rows, ids

    def feed(self, input_ids: torch.Tensor, dst: list[int], src: list[int], tokens: torch.Tensor) -> None:
        """input_ids[dst[i]] = tokens[src[i]] on the device, queued behind the step's uploads. Steady
        decode feeds consecutive rows from consecutive tokens: one device copy then, instead of an
        index upload, a gather and a scatter (each device op costs a few us between two steps)."""
        n = len(dst)
        if n > self.capacity:
            raise RuntimeError(f"xyserve: {n} pending tokens exceed the feed's capacity {self.capacity}")
        if dst == list(range(dst[0], dst[0] + n)) and src == list(range(src[0], src[0] + n)):
            input_ids[dst[0] : dst[0] + n].copy_(tokens[src[0] : src[0] + n])
            return
        if self._copied is not None:
            self._copied.synchronize()  # the last step's index copy has left the pinned buffer
        host = self._index_host.numpy()
        host[:n], host[n : 2 * n] = np.asarray(dst, np.int64), np.asarray(src, np.int64)
        index = self._index[: 2 * n]
        if index.data_ptr() != self._index_host.data_ptr():
            index.copy_(self._index_host[: 2 * n], non_blocking=True)
            self._copied.record()
        input_ids.index_copy_(0, index[:n], tokens.index_select(0, index[n:]))

    def launch(self, out: SchedulerOutput, sample_ids: list[str], tokens: torch.Tensor) -> InflightStep:
        """Start reading a launched step's tokens back to the host."""
        host = self._readback[self._turn]
        self._turn ^= 1
        if tokens.numel() > host.numel():
            raise RuntimeError(f"xyserve: {tokens.numel()} sampled tokens exceed the read-back capacity")
        if tokens.device.type == "cuda":
            host[: tokens.numel()].copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host[: tokens.numel()].copy_(tokens)
            ready = None
        return InflightStep(out, sample_ids, tokens, host, ready)
