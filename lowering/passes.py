"""The lowering pipeline: attention first (it consumes the matmuls of eager attention), then sibling
linears fused over adjacent weights (on request), then residual add + RMSNorm into the linear they
feed (on request, after the siblings: a norm must feed one linear), then GEMM, then cos / sin
tables shared by the layers that read them.

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
from lowering.norm_linear import NormLinearPass
from lowering.report import LoweringReport
from lowering.shared_tables import SharedTablePass
from lowering.sibling_linears import SiblingLinearPass


def uuid(lower_attention: bool = True, lower_gemm: bool = True, impl: str = "auto", fuse_sibling_linears: bool = False,
         share_tables: bool = True, fuse_norm_linear: bool = False) -> str:
    """A stable key for Inductor's caches: which passes ran, in which version, with which impl."""
    passes = ((AttentionPass, lower_attention), (SiblingLinearPass, fuse_sibling_linears),
              (NormLinearPass, fuse_norm_linear), (LinearPass, lower_gemm), (SharedTablePass, share_tables))
    parts = [p.uuid() for p, on in passes if on]
    return hashlib.sha256("|".join(parts + [impl]).encode()).hexdigest()


def lower(
    gm: fx.GraphModule,
    lower_attention: bool = True,
    lower_gemm: bool = True,
    impl: str = "auto",
    example_inputs: list | None = None,
    share_tables: bool = True,
    fuse_norm_linear: bool = False,
) -> LoweringReport:
    """Rewrite `gm` in place; returns what was rewritten and what was left to Inductor (and why).
    With `example_inputs` (the real tensors Dynamo passes a backend), sibling linears over adjacent
    weights are fused first (see sibling_linears.py)."""
    report = LoweringReport()
    if lower_attention:
        AttentionPass()(gm, report, impl)
    if example_inputs is not None:
        SiblingLinearPass()(gm, report, example_inputs)
    if fuse_norm_linear:
        NormLinearPass()(gm, report, impl)
    if lower_gemm:
        LinearPass()(gm, report, impl)
    if share_tables:
        SharedTablePass()(gm, report)
    gm.graph.lint()
    gm.recompile()
    return report
