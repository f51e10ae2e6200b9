"""`xy_inductor.explain(model, *args)`: what the xyserve backend lowers, what it leaves, and why.

Dynamo traces the call once (no Inductor compile), the lowering passes run on a copy of every
captured graph, and the result is a plain dataclass with a readable `str()`.
"""
from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from lowering.passes import lower
from lowering.report import LoweringReport, Skipped


@dataclass(slots=True)
class ExplainReport:
    graph_count: int
    graph_break_count: int
    break_reasons: list[str]
    lowered: Counter  # pattern -> number of rewrites over all graphs
    per_layer: dict[int | None, Counter]  # decoder layer -> pattern -> count
    left_to_inductor: list[Skipped] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"xyserve explain: {self.graph_count} graph(s), {self.graph_break_count} graph break(s)",
            "lowered to xyserve ops: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.lowered.items())) or "nothing"),
        ]
        layers = sorted(k for k in self.per_layer if k is not None)
        if layers:
            first = dict(sorted(self.per_layer[layers[0]].items()))
            same = all(self.per_layer[i] == self.per_layer[layers[0]] for i in layers)
            lines.append(f"per decoder layer ({len(layers)} layers{', all alike' if same else ''}): {first}")
            if not same:
                lines += [f"  layer {i}: {dict(sorted(self.per_layer[i].items()))}" for i in layers[1:]]
        if None in self.per_layer:
            lines.append(f"outside decoder layers: {dict(sorted(self.per_layer[None].items()))}")
        for s in self.left_to_inductor:
            where = f"layer {s.layer}" if s.layer is not None else "model"
            lines.append(f"left to Inductor ({s.what}, {where}, node {s.node}): {s.reason}")
        lines += [f"graph break: {r}" for r in self.break_reasons]
        return "\n".join(lines)


def summarize(reports: list[LoweringReport], graph_count: int, breaks: list[str]) -> ExplainReport:
    lowered: Counter = Counter()
    per_layer: dict[int | None, Counter] = defaultdict(Counter)
    skipped: list[Skipped] = []
    for r in reports:
        lowered.update(r.counters)
        for w in r.rewrites:
            per_layer[w.layer][w.pattern] += 1
        skipped.extend(r.skipped)
    return ExplainReport(graph_count, len(breaks), breaks, lowered, dict(per_layer), skipped)


def explain(model, *args, lower_attention: bool = True, lower_gemm: bool = True, **kwargs) -> ExplainReport:
    """Trace `model(*args, **kwargs)` with Dynamo and report what xyserve would lower. Attention and
    linears count as lowered unless turned off here: the backend lowers them on the CPU and under
    CUDA graphs, but by default (None) not on a GPU without CUDA graphs (see CompileOptions)."""
    with torch.no_grad():
        out = torch._dynamo.explain(model)(*args, **kwargs)
    reports = [lower(copy.deepcopy(g), lower_attention, lower_gemm) for g in out.graphs]
    breaks = [f"{b.reason}" for b in out.break_reasons]
    return summarize(reports, out.graph_count, breaks)
