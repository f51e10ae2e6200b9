"""The lowering pipeline: attention first (it consumes the matmuls of eager attention), then GEMM.

Each pass is a pattern/replacement pair that records every rewrite in a LoweringReport, so tests
assert exactly what was rewritten. Passes are idempotent (lowered ops match no pattern), which
matters because Dynamo may call the backend twice for one graph under dynamic shapes.
"""
from __future__ import annotations

import hashlib

from torch import fx

import lowering.ops  # noqa: F401  (registers torch.ops.xyserve.*)
from lowering.attention import AttentionPass
from lowering.linear import LinearPass
from lowering.report import LoweringReport


def uuid(lower_attention: bool = True, lower_gemm: bool = True, impl: str = "auto") -> str:
    """A stable key for Inductor's caches: which passes ran, in which version, with which impl."""
    parts = [p.uuid() for p, on in ((AttentionPass, lower_attention), (LinearPass, lower_gemm)) if on]
    return hashlib.sha256("|".join(parts + [impl]).encode()).hexdigest()


def lower(gm: fx.GraphModule, lower_attention: bool = True, lower_gemm: bool = True, impl: str = "auto") -> LoweringReport:
    """Rewrite `gm` in place; returns what was rewritten and what was left to Inductor (and why)."""
    report = LoweringReport()
    if lower_attention:
        AttentionPass()(gm, report, impl)
    if lower_gemm:
        LinearPass()(gm, report, impl)
    gm.graph.lint()
    gm.recompile()
    return report
