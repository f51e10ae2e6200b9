"""Arrival counters of the kernels that finish split work inside their own launch: each piece of a
split item (a split-KV attention task, a SmoothGEMM split-K or stream-K tile) bumps the item's
counter after publishing its partial, and the last to arrive merges and sets the counter back to
zero. So the buffer is zero between launches, and every such kernel on a device shares one.

    counters  [ 0 0 0 0 ... ]   ->  during a launch [ 2 0 1 0 ... ]  ->  after it [ 0 0 0 0 ... ]

Launches must not overlap in time (one stream, as the engine runs). A captured CUDA graph keeps
the address it saw, so a buffer is never freed: an outgrown one stays alive (and stays zero).
The first call for a device should happen outside a capture, so the buffer is not allocated in
the graph's memory pool.
"""
from __future__ import annotations

import torch

from ascend_kernels.profiles import next_power_of_2

MIN_COUNTERS = 4096
_BUFFERS: dict[str, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """At least `size` int32 counters on `device`, all zero."""
    key = str(device)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < size:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _BUFFERS[key] = torch.zeros(max(MIN_COUNTERS, next_power_of_2(size)), dtype=torch.int32, device=device)
    return buf


def all_zero() -> bool:
    """Every counter of every buffer is zero (what each launch must leave behind)."""
    return all(int(b.count_nonzero()) == 0 for b in [*_BUFFERS.values(), *_OUTGROWN])
