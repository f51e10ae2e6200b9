"""The `xyserve` torch.compile backend.

    torch.compile(model, backend="xyserve")          # found through the torch_dynamo_backends entry point
    torch.compile(model, backend="xyserve", options={"impl": "reference", "inductor_config": {...}})

The Dynamo (torch-level) graph is rewritten first: there SDPA still has its meaning (is_causal,
scale, GQA) and GPT-2's Conv1D is still an addmm with a [K, N] weight. Inductor's compile_fx then
compiles everything, our custom ops included (they are opaque calls with fake implementations).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import fx

from lowering.passes import lower, uuid
from lowering.report import LoweringReport
from xy_inductor.config import CompileOptions

log = logging.getLogger("xyserve")

# Reports of the graphs compiled since the last `reset_reports()` (read by `explain`).
_REPORTS: list[LoweringReport] = []


def reset_reports() -> None:
    _REPORTS.clear()


def reports() -> list[LoweringReport]:
    return list(_REPORTS)


def _inductor_patches(mode: str | None, opts: CompileOptions) -> dict[str, Any]:
    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(opts.inductor_config)
    return patches


def xyserve(
    gm: fx.GraphModule,
    example_inputs: list,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable:
    """Lower attention and linear nodes to xyserve ops, then hand the graph to Inductor."""
    opts = CompileOptions.from_options(options)
    fuse = example_inputs if opts.fuse_sibling_linears else None
    report = lower(gm, opts.lower_attention, opts.lower_gemm, opts.impl, fuse, opts.share_tables, opts.fuse_norm_linear)
    _REPORTS.append(report)
    for s in report.skipped:
        log.warning("xyserve: %s node %s left to Inductor: %s", s.what, s.node, s.reason)
    if not opts.use_inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=_inductor_patches(mode, opts))


xyserve.uuid = uuid  # type: ignore[attr-defined]
