"""StepBuffer: one step's model inputs and attention metadata packed into one flat int32 buffer.

The host side is a (pinned, on CUDA) int32 array; the device side is a buffer of the same layout,
so a step costs two host-to-device copies (everything up to the used part of the Task-Table, and
the used rows of the block table) instead of one tensor creation per input. The int64 inputs
(input ids, positions, slots, logits rows) sit at even offsets and are viewed as int64.

A `StepLayout` fixes the capacity of every segment. A CUDA-graph bucket keeps one layout for its
whole life (the graph captured views of those exact offsets); a step bigger than every bucket
gets a layout of its own. Rows past the step's real tokens are padding: token 0 at position 0,
slot -1 (never stored), outside cu_seqlens_q (never attended). Request slots past the real
requests have no query rows and no KV; logits rows past the real ones point at row 0 and are
dropped after the forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from ascend_kernels.tiling import HEADER, TASK_FIELDS
from xy_inductor.engine.outputs import ScheduledRequest


MERGE_GAP = 4096  # int32s of unused buffer worth copying to save a copy (see StepBuffer.used)
WIDE_ROWS = 16384  # int32s of block-table rows past which only their used columns are uploaded (see wide)


@dataclass(slots=True, frozen=True)
class StepLayout:
    """Capacities (elements) of one step's segments and their int32 offsets in the flat buffer."""

    num_tokens: int  # T: rows of input_ids / position_ids / slot_mapping
    num_seqs: int  # S: request slots (cu_seqlens_q has S + 1 entries)
    num_keep: int  # K: logits rows
    width: int  # W: block-table columns
    table_len: int  # int32 capacity of the Task-Table (0: no table, the kernel plans itself)

    # int32 offsets of the segments: int64 ones first (even offsets keep them 8-byte aligned)
    ids: int = field(init=False)
    positions: int = field(init=False)
    slots: int = field(init=False)
    keep: int = field(init=False)
    cu: int = field(init=False)
    seq_lens: int = field(init=False)
    table: int = field(init=False)
    block_table: int = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_seqs", "num_keep", "width"):
            if getattr(self, name) < 2:  # Dynamo specialises sizes 0 and 1: a new compile each
                raise ValueError(f"xyserve: StepLayout.{name} must be >= 2, got {getattr(self, name)}")
        sizes = {"ids": 2 * self.num_tokens, "positions": 2 * self.num_tokens, "slots": 2 * self.num_tokens,
                 "keep": 2 * self.num_keep, "cu": self.num_seqs + 1, "seq_lens": self.num_seqs,
                 "table": self.table_len, "block_table": self.num_seqs * self.width}
        offset = 0
        for name, n in sizes.items():
            object.__setattr__(self, name, offset)
            offset += n
        object.__setattr__(self, "size", offset)

    def fits(self, num_tokens: int, num_seqs: int, num_keep: int, width: int, table_len: int) -> bool:
        return (num_tokens <= self.num_tokens and num_seqs <= self.num_seqs and num_keep <= self.num_keep
                and width <= self.width and table_len <= self.table_len)


@dataclass(slots=True)
class StepViews:
    """Tensors of one layout over a flat int32 buffer (host or device)."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, negative = padding row
    logits_to_keep: torch.Tensor  # [K] int64 packed rows whose logits are wanted
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    task_table: torch.Tensor | None  # [table_len] int32, None when the layout has no table
    block_table: torch.Tensor  # [S, W] int32


def views(flat: torch.Tensor, layout: StepLayout) -> StepViews:
    """Views of `flat` (int32, 1-D, at least layout.size long) for the layout's segments."""
    t, k, s = layout.num_tokens, layout.num_keep, layout.num_seqs

    def wide(off: int, n: int) -> torch.Tensor:
        return flat[off : off + 2 * n].view(torch.int64)

    return StepViews(
        input_ids=wide(layout.ids, t),
        position_ids=wide(layout.positions, t),
        slot_mapping=wide(layout.slots, t),
        logits_to_keep=wide(layout.keep, k),
        cu_seqlens_q=flat[layout.cu : layout.cu + s + 1],
        seq_lens=flat[layout.seq_lens : layout.seq_lens + s],
        task_table=flat[layout.table : layout.table + layout.table_len] if layout.table_len else None,
        block_table=flat[layout.block_table : layout.size].view(s, layout.width),
    )


@dataclass(slots=True)
class StepShape:
    """The real sizes of one step (what a layout must fit) and its per-request numbers."""

    num_tokens: int
    num_keep: int  # logits rows: d + 1 per sampling row with d drafted tokens
    width: int  # most blocks of any request
    q_lens: np.ndarray  # [R] int64
    kv_lens: np.ndarray  # [R] int64
    stages: list[str]

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)


def step_shape(rows: list[ScheduledRequest]) -> StepShape:
    n = len(rows)
    q_lens = np.fromiter((len(r.token_ids) for r in rows), np.int64, n)
    computed = np.fromiter((r.num_computed_tokens for r in rows), np.int64, n)
    keep = sum(r.num_draft_tokens + 1 for r in rows if r.sample)
    width = max(len(r.block_table) for r in rows)
    return StepShape(int(q_lens.sum()), keep, width, q_lens, computed + q_lens, [r.stage.value for r in rows])


def _segments(arange: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Concatenated ranges starts[i] .. starts[i] + lengths[i] - 1, without a Python loop."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    return arange[:total] - np.repeat(first - starts, lengths)


class StepBuffer:
    """The host half of the flat buffer and the vectorised packing of a step into it."""

    def __init__(self, size: int, pin: bool) -> None:
        self.host = torch.empty(size, dtype=torch.int32, pin_memory=pin)
        self.np = self.host.numpy()
        self.pin = pin
        self._arange = np.arange(max(size, 1), dtype=np.int64)
        self.rows_host = torch.empty(0, dtype=torch.int32)  # wide steps' used block-table columns (grows)
        self.rows_scratch: torch.Tensor | None = None  # their device copy, on the flat buffer's device (grows)

    def ensure(self, size: int) -> None:
        if size > self.host.numel():
            self.__init__(max(size, 2 * self.host.numel()), self.pin)

    def pack(self, rows: list[ScheduledRequest], shape: StepShape, layout: StepLayout,
             table: np.ndarray | None) -> None:
        """Write the step into the host buffer at the layout's offsets (padding included)."""
        buf, t, n = self.np, shape.num_tokens, shape.num_seqs
        ar = self._arange
        wide = lambda off, cap: buf[off : off + 2 * cap].view(np.int64)
        ids, pos, slots = wide(layout.ids, layout.num_tokens), wide(layout.positions, layout.num_tokens), \
            wide(layout.slots, layout.num_tokens)
        ids[:t] = list(chain.from_iterable(r.token_ids for r in rows))
        slots[:t] = list(chain.from_iterable(r.slot_mapping for r in rows))
        cu_end = np.cumsum(shape.q_lens)
        pos[:t] = _segments(ar, shape.q_lens, shape.kv_lens - shape.q_lens)
        ids[t:], pos[t:], slots[t:] = 0, 0, -1
        # logits rows: every drafted position of a verify row and the one after, in row order
        num_keep = np.fromiter(((r.num_draft_tokens + 1) * r.sample for r in rows), np.int64, n)
        keep = wide(layout.keep, layout.num_keep)
        keep[: shape.num_keep] = _segments(ar, num_keep, cu_end - num_keep)
        keep[shape.num_keep :] = 0
        cu = buf[layout.cu : layout.cu + layout.num_seqs + 1]
        cu[0], cu[1 : n + 1], cu[n + 1 :] = 0, cu_end, t
        lens = buf[layout.seq_lens : layout.seq_lens + layout.num_seqs]
        lens[:n], lens[n:] = shape.kv_lens, 0
        if table is not None:
            buf[layout.table : layout.table + len(table)] = table
        # block table: only each request's own blocks are written; the kernels never read past them
        lengths = np.fromiter((len(r.block_table) for r in rows), np.int64, n)
        flat = buf[layout.block_table : layout.size]
        flat[_segments(ar, lengths, ar[:n] * layout.width)] = list(chain.from_iterable(r.block_table for r in rows))

    def pack_empty(self, layout: StepLayout) -> None:
        """A step with no requests (what CUDA graphs are captured on): nothing stored or attended."""
        buf = self.np[: layout.size]
        buf[:] = 0
        buf[layout.slots : layout.slots + 2 * layout.num_tokens].view(np.int64)[:] = -1
        if layout.table_len:  # one program, no tasks: header, then the program starts [0, 0]
            buf[layout.table : layout.table + HEADER + 2] = [1, 0, 0, TASK_FIELDS] + [0] * (HEADER - 4) + [0, 0]

    def upload(self, flat: torch.Tensor, layout: StepLayout, shape: StepShape, table_len: int) -> None:
        """Copy what the step filled into `flat` (the device's buffer): the ranges of `used`, and a wide
        step's block-table rows by `_upload_rows`."""
        wide = self.wide(layout, shape)
        for lo, hi in self.used(layout, shape, table_len, wide):
            flat[lo:hi].copy_(self.host[lo:hi], non_blocking=True)
        if wide:
            self._upload_rows(flat, layout, shape)

    def used(self, layout: StepLayout, shape: StepShape, table_len: int, wide: bool) -> list[tuple[int, int]]:
        """The [start, end) ranges of the flat buffer a step fills that go up as they are: the inputs and
        the Task-Table, then the block table's rows (unless `wide`); one range when the unused table
        capacity between them is under MERGE_GAP int32s (a copy's fixed cost on the device, a few us,
        moves ~16 KB)."""
        head = (0, layout.table + table_len)
        rows = (layout.block_table, layout.block_table + shape.num_seqs * layout.width)
        if wide:
            return [head]
        if rows[0] - head[1] < MERGE_GAP:
            return [(0, rows[1])]
        return [head, rows]

    @staticmethod
    def wide(layout: StepLayout, shape: StepShape) -> bool:
        """A CUDA-graph bucket's block table has max_model_len / block_size columns (8,192 for a
        131,072-token model: 32 KB a row), mostly unused: past WIDE_ROWS int32s, when its rows use at
        most half, only their used columns go up."""
        return shape.num_seqs * layout.width > WIDE_ROWS and 2 * shape.width <= layout.width

    def _upload_rows(self, flat: torch.Tensor, layout: StepLayout, shape: StepShape) -> None:
        """A wide step's block table: its used columns [S, w] packed in a host buffer, one copy of them
        into a scratch buffer on flat's device and one device copy into flat's [S, W] rows."""
        s, w, width = shape.num_seqs, shape.width, layout.width
        if self.rows_host.numel() < s * w:
            self.rows_host = torch.empty(2 * s * w, dtype=torch.int32, pin_memory=self.pin)
        if self.rows_scratch is None or self.rows_scratch.numel() < s * w:
            with torch.inference_mode(False):  # a normal tensor, like the runner's buffers
                self.rows_scratch = torch.empty(2 * s * w, dtype=torch.int32, device=flat.device)
        scratch = self.rows_scratch
        used = self.np[layout.block_table : layout.block_table + s * width].reshape(s, width)[:, :w]
        self.rows_host.numpy()[: s * w].reshape(s, w)[:] = used
        scratch[: s * w].copy_(self.rows_host[: s * w], non_blocking=True)
        rows = flat[layout.block_table : layout.block_table + s * width].view(s, width)
        rows[:, :w].copy_(scratch[: s * w].view(s, w))
