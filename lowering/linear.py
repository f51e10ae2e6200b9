"""linear / addmm / GPT-2 Conv1D  ->  xyserve::gemm.

    F.linear(x, W[N, K], b)          -> gemm(x, W, b, weight_kn=False)
    torch.addmm(b[N], x[M, K], W[K, N]) -> gemm(x, W, b, weight_kn=True)    (HF Conv1D)
"""
from __future__ import annotations

import torch
from torch import fx

from lowering.patterns import ADDMM, LINEAR, arg, is_call, layer_of, val
from lowering.report import LoweringReport


def _float(t) -> bool:
    return t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _match_linear(node: fx.Node):
    """(x, weight, bias, weight_kn) or a reason string."""
    x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    xv, wv = val(x), val(w)
    if wv is None or wv.dim() != 2 or not _float(xv) or xv.dtype != wv.dtype:
        return "weight is not a 2-D float matrix of the input's dtype"
    if b is not None and (val(b) is None or val(b).dim() != 1):
        return "bias is not a vector"
    return x, w, b, False


def _match_addmm(node: fx.Node):
    b, x, w = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
    if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
        return "addmm with beta/alpha != 1"
    bv, xv, wv = val(b), val(x), val(w)
    if xv is None or wv is None or bv is None or xv.dim() != 2 or wv.dim() != 2:
        return "operands are not 2-D matrices"
    if bv.dim() != 1 or not _float(xv) or not (xv.dtype == wv.dtype == bv.dtype):
        return "bias is not a vector of the matrices' dtype"
    return x, w, b, True


class LinearPass:
    """Every linear-like node becomes one `xyserve::gemm` (SmoothGEMM on GPU)."""

    name = "linear"

    @staticmethod
    def uuid() -> str:
        return "xyserve.linear.v1"

    def __call__(self, gm: fx.GraphModule, report: LoweringReport, impl: str) -> None:
        for node in list(gm.graph.nodes):
            if is_call(node, LINEAR):
                pattern, found = "linear", _match_linear(node)
            elif is_call(node, ADDMM):
                pattern, found = "addmm", _match_addmm(node)
            else:
                continue
            if isinstance(found, str):
                report.skip("gemm", node, found, layer_of(node))
                continue
            x, w, b, weight_kn = found
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.xyserve.gemm.default, (x, w, b, weight_kn, impl))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            report.rewrote(pattern, new, layer_of(new))
