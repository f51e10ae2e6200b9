"""CudaGraphs: one captured forward per token bucket, replayed for every step that fits it.

A step of T tokens runs in the smallest bucket >= T (see `bucket_sizes`): its inputs are written
into the bucket's static views of one device buffer (StepBuffer), padded virtually (padding rows
are never stored or attended, see step_buffer.py), and the bucket's graph is replayed: no Python,
no Dynamo guards, no kernel launches on the host. Every kernel in the graph reads the step's real
extent from those buffers (cu_seqlens_q, seq_lens, slot_mapping, the Task-Table header).

All buckets are captured at start-up, largest first into one memory pool, so the smaller graphs
reuse the larger ones' activation memory; each capture follows two warm-up runs of the same shapes
(compilation, Triton autotuning and lazily created workspaces must not happen inside a capture).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from xy_inductor.engine.step_buffer import StepLayout

# Up to 2,048 tokens an eager step still pays for its launches: on an H200 a 2,048-token prefill
# step of Llama-3.2-1B took 11.7 ms eagerly and 9.4 ms as a graph replay. Bigger steps are GPU
# bound, and a step padded up to a bucket computes its padded rows in cuBLAS GEMMs.
MAX_DEFAULT_BUCKET = 2048


def bucket_sizes(sizes: Sequence[int] | None, budget: int) -> list[int]:
    """Sorted token buckets, each >= 2 (Dynamo specialises size 1) and <= the token budget.

    Default: powers of two from 2 up to min(budget, 2048), plus that cap itself."""
    if sizes is None:
        cap = min(budget, MAX_DEFAULT_BUCKET)
        sizes = [1 << i for i in range(1, cap.bit_length()) if 1 << i <= cap] + [cap]
    return sorted({max(2, min(int(s), budget)) for s in sizes})


class CudaGraphs:
    def __init__(self, layouts: Sequence[StepLayout], device: torch.device) -> None:
        self.layouts = sorted(layouts, key=lambda lay: lay.num_tokens)
        self.device = device
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.num_replays = 0

    def captured(self, layout: StepLayout) -> bool:
        return layout.num_tokens in self._graphs

    def capture(self, run: Callable[[StepLayout], object], reset: Callable[[StepLayout], None],
                use_tqdm: bool = True) -> None:
        """Capture `run(layout)` (the forward on the layout's static views, returning its output
        tensors: the logits and their argmax) for every bucket; `reset(layout)` first writes an
        empty step (no requests) into the views."""
        from tqdm.auto import tqdm

        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        bar = tqdm(list(reversed(self.layouts)), desc="xyserve: capturing CUDA graphs", unit="graph",
                   disable=not use_tqdm)
        for layout in bar:
            bar.set_postfix(tokens=layout.num_tokens, refresh=False)
            reset(layout)
            for _ in range(2):
                run(layout)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # entering a capture empties the allocator's cache anyway: empty it first, so what is
            # reserved afterwards is the graphs' private pool, not the warm-ups' freed memory
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(self.device)
            with torch.cuda.graph(graph, pool=pool):
                output = run(layout)
            self.capture_bytes += torch.cuda.memory_reserved(self.device) - reserved
            self._graphs[layout.num_tokens] = (graph, output)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start

    def replay(self, layout: StepLayout):
        """Run the bucket's graph on what its views hold now; the captured output (static tensors:
        valid until the bucket's next replay)."""
        graph, output = self._graphs[layout.num_tokens]
        graph.replay()
        self.num_replays += 1
        return output

    @property
    def stats(self) -> dict:
        return {
            "cuda_graph_buckets": sorted(self._graphs),
            "cuda_graph_capture_s": round(self.capture_seconds, 3),
            "cuda_graph_memory_mib": round(self.capture_bytes / 2**20, 1),
            "cuda_graph_replays": self.num_replays,
        }
