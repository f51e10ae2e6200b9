"""Tables of transcendentals read by many kernels (RoPE's cos / sin) are computed once.

Inductor inlines a pointwise result into every consumer unless it reads many buffers or is long
(`realize_reads_threshold`, `realize_opcount_threshold`); cos / sin of the rotary angles read one
buffer, so each decoder layer's q and k RoPE kernels recompute them, 2 x num_layers times per
forward. On an H200 that made the q-side RoPE kernel of Llama-3.2-1B 4x slower than its memory
traffic (21 us for 2,048 tokens, 5 us at decode, against 6 / 2.8 us for the k side). The pass puts
an opaque copy (`xyserve::materialize`) after the chain, where it fans out:

    angles ── cos ── * scale ── .to(bf16) ──┬── layer 0: q*cos, k*cos        (each kernel: cos again)
                                            ├── layer 1: ...
    angles ── cos ── * scale ── .to(bf16) ── materialize ──┬── layer 0 ...  (cos once, read after)

The values are the same (the chain keeps its explicit dtype conversion, as eager does).

The rotary angles themselves come from a matmul with a contraction of length one
(inv_freq [B, D/2, 1] @ positions [B, 1, T]): an outer product that Inductor leaves to a separate
cuBLAS SGEMM launch (3 us of a 1.2 ms decode step). The pass writes it as the broadcast multiply it
is, so Inductor fuses it into the cos / sin kernel; one fp32 product per element either way.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from lowering.patterns import DIV, MATMUL, MUL, is_call, layer_of, set_fake_value, val
from lowering.report import LoweringReport

TRIG = {torch.cos, torch.sin}
# single-user steps the walk follows from cos / sin to the fan-out point
_SCALE = MUL | DIV | {operator.neg, torch.neg}
_CAST_METHODS = ("to", "float", "half", "bfloat16", "type", "unsqueeze", "contiguous")


def _follows(node: fx.Node) -> bool:
    return is_call(node, _SCALE) or (node.op == "call_method" and node.target in _CAST_METHODS)


def _is_outer_product(node: fx.Node) -> bool:
    """matmul(a [..., n, 1], b [..., 1, m]) of float tensors of rank >= 2 (a length-one contraction)."""
    if not is_call(node, MATMUL | {torch.bmm}, "matmul") or len(node.args) != 2:
        return False
    a, b = (val(x) if isinstance(x, fx.Node) else None for x in node.args)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 2 or b.dim() < 2:
        return False
    one = (a.shape[-1], b.shape[-2])  # static sizes only: comparing a symbolic size would add a guard
    return a.dtype.is_floating_point and a.dtype == b.dtype and all(type(s) is int and s == 1 for s in one)


def fan_out_point(trig: fx.Node) -> fx.Node | None:
    """The first node after `trig` (itself included) with >= 2 users, through single-user scales,
    casts and views; None when the chain ends in one consumer (nothing is recomputed)."""
    node = trig
    while len(node.users) == 1:
        (user,) = node.users
        if not _follows(user):
            return None
        node = user
    return node if len(node.users) >= 2 else None


class SharedTablePass:
    """Insert `xyserve::materialize` where a cos / sin chain fans out to >= 2 consumers."""

    name = "shared_table"
    outer_name = "outer_product"

    @staticmethod
    def uuid() -> str:
        return "xyserve.shared_tables.v2"

    def __call__(self, gm: fx.GraphModule, report: LoweringReport) -> None:
        g = gm.graph
        for mm in [n for n in g.nodes if _is_outer_product(n)]:
            with g.inserting_after(mm):
                prod = g.call_function(torch.mul, tuple(mm.args))
            prod.meta.update(mm.meta)  # same shape, dtype and value
            mm.replace_all_uses_with(prod)
            g.erase_node(mm)
            report.rewrote(self.outer_name, prod, layer_of(prod))
        for trig in [n for n in g.nodes if is_call(n, TRIG, "cos") or is_call(n, TRIG, "sin")]:
            point = fan_out_point(trig)
            if point is None or any(is_call(u, {torch.ops.xyserve.materialize.default}) for u in point.users):
                continue  # single consumer, or already shared (the pass may run twice per graph)
            with g.inserting_after(point):
                shared = g.call_function(torch.ops.xyserve.materialize.default, (point,))
            if val(point) is not None:  # the op's own fake implementation gives its value
                set_fake_value(shared, torch.ops.xyserve.materialize.default, (point,))
            point.replace_all_uses_with(shared, delete_user_cb=lambda u: u is not shared)
            report.rewrote(self.name, point, layer_of(point))

