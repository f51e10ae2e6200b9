"""Sibling linears that read one input and whose weights sit back to back in memory -> one GEMM.

    x ──┬─ linear(x, Wq) ─> q               x ── linear(x, W[q|k|v]) ──┬─ narrow(0, Nq)      -> q
        ├─ linear(x, Wk) ─> k     ==>                                  ├─ narrow(Nq, Nk)     -> k
        └─ linear(x, Wv) ─> v                                          └─ narrow(Nq+Nk, Nv)  -> v

    one storage:  [ Wq: Nq x K | Wk: Nk x K | Wv: Nv x K ]   (row-major, rows adjacent)

`W[q|k|v]` is an `as_strided` view over the first weight's storage, so nothing is copied and the
graph gains no input (Inductor's compile_fx takes no new placeholders or buffers). The pass reads
the real example inputs to see which weights are adjacent; it never moves memory. The engine lays
q/k/v and gate/up out that way on purpose (`xy_inductor.engine.weight_packing`). At decode sizes a
GEMM reads its weight once whatever its N, so one call instead of three saves launches and wave
tails, not bytes.

Only on request (`CompileOptions.fuse_sibling_linears`): the graph is correct only while the
weights stay where they were at compile time, which holds for in-place updates (`load_state_dict`,
`copy_`) but not for a weight swapped for a new tensor; the engine checks that before each request.
Dynamo may also reuse the graph for another instance of the same model class (parameters are graph
inputs); that is right when that instance is packed the same way, as the engine packs every model.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx

from lowering.patterns import LINEAR, arg, is_call, layer_of, set_fake_value
from lowering.report import LoweringReport


def _real(node, real: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    return real.get(node) if isinstance(node, fx.Node) else None


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b starts where a ends, in the same storage, same dtype/device and inner layout."""
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.dtype == b.dtype
        and a.shape[1:] == b.shape[1:]
        and b.storage_offset() == a.storage_offset() + a.numel()
    )


def _dense(t: torch.Tensor | None, dim: int) -> bool:
    return t is not None and t.dim() == dim and t.is_contiguous() and t.is_floating_point()


def _runs(nodes: list[fx.Node], real: dict) -> list[list[fx.Node]]:
    """Maximal chains of linears whose weights (and biases) follow each other in memory."""
    weights = {n: _real(arg(n, 1, "weight"), real) for n in nodes}
    nodes = sorted((n for n in nodes if _dense(weights[n], 2)), key=lambda n: weights[n].storage_offset())
    runs: list[list[fx.Node]] = []
    for n in nodes:
        prev = runs[-1][-1] if runs else None
        if prev is not None and _adjacent(weights[prev], weights[n]) and _bias_follows(prev, n, real):
            runs[-1].append(n)
        else:
            runs.append([n])
    return [r for r in runs if len(r) > 1]


def _bias_follows(a: fx.Node, b: fx.Node, real: dict) -> bool:
    ba, bb = arg(a, 2, "bias"), arg(b, 2, "bias")
    if ba is None and bb is None:
        return True
    ra, rb = _real(ba, real), _real(bb, real)
    return _dense(ra, 1) and _dense(rb, 1) and _adjacent(ra, rb)


def _linear_meta(x, w, b):
    """F.linear's output shape without running a matmul on fake tensors."""
    return x.new_empty(*x.shape[:-1], w.shape[0])


class SiblingLinearPass:
    """Fuse every run of >= 2 sibling linears over adjacent weights into one linear + narrows."""

    name = "sibling_linears"

    @staticmethod
    def uuid() -> str:
        return "xyserve.sibling_linears.v1"

    def __call__(self, gm: fx.GraphModule, report: LoweringReport, example_inputs: list) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        real = {n: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}
        by_input: dict[fx.Node, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if is_call(node, LINEAR) and isinstance(arg(node, 0, "input"), fx.Node):
                by_input[arg(node, 0, "input")].append(node)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for x, nodes in by_input.items():
            for run in _runs(nodes, real):
                self._fuse(gm, x, run, real, order)
                report.rewrote(self.name, run[0], layer_of(run[0]))

    @staticmethod
    def _fuse(gm: fx.GraphModule, x: fx.Node, run: list[fx.Node], real: dict, order: dict) -> None:
        g = gm.graph
        w0 = real[arg(run[0], 1, "weight")]
        sizes = [real[arg(n, 1, "weight")].shape[0] for n in run]
        total, inner = sum(sizes), tuple(w0.shape[1:])
        first = min(run, key=order.__getitem__)
        with g.inserting_before(first):
            w_args = (arg(run[0], 1, "weight"), (total, *inner), w0.stride(), w0.storage_offset())
            w = g.call_function(torch.as_strided, w_args)
            set_fake_value(w, torch.as_strided, w_args)
            b = arg(run[0], 2, "bias")
            if b is not None:
                b0 = real[b]
                b_args = (b, (total,), (1,), b0.storage_offset())
                b = g.call_function(torch.as_strided, b_args)
                set_fake_value(b, torch.as_strided, b_args)
            y = g.call_function(torch._C._nn.linear, (x, w, b))
            set_fake_value(y, _linear_meta, (x, w, b))
            y.meta["nn_module_stack"] = run[0].meta.get("nn_module_stack", {})
            start = 0
            for node, n in zip(run, sizes):
                piece = g.call_function(torch.narrow, (y, -1, start, n))
                set_fake_value(piece, torch.narrow, (y, -1, start, n))
                piece.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                node.replace_all_uses_with(piece)
                start += n
        for node in run:
            g.erase_node(node)
