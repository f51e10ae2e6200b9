"""Residual add + RMSNorm + the linear it feeds  ->  one `xyserve::norm_linear` (NormGEMV on GPU).

HF decoder layers (Llama, Mistral, Qwen2, ...) as Dynamo records them, after sibling linears are
fused (q/k/v and gate/up are one linear each, lowering/sibling_linears.py):

    h  = add(r, y)                                       (absent in layer 0: h is the embedding)
    hf = to(h, float32)
    n  = mul(w, to(mul(hf, rsqrt(add(mean(pow(hf, 2), -1, keepdim=True), eps))), dtype))
    z  = linear(n, W)                                    -> out           ("norm_linear")
    z  = linear(n, W[g|u]); silu(narrow(z, 0, I)) * narrow(z, I, I)  -> out ("norm_linear_gated")

  ==>  out, h' = norm_linear(y, r, w, eps, W, gated)     (h' replaces h for its other users)

At decode sizes the norm, the add and SiLU x up are separate few-microsecond launches around a
GEMV; fused, they cost the GEMV a re-read of a few rows it has in L2. Only on request
(`CompileOptions.fuse_norm_linear`, off by default: see ascend_kernels/norm_gemv.py for why): a norm
feeding several linears (an unpacked model's q/k/v) is left to Inductor and reported.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from lowering.patterns import ADD, LINEAR, MUL, arg, is_call, layer_of, prune, same_size, single_user, val
from lowering.report import LoweringReport

_SILU = {F.silu, torch.nn.functional.silu}
_NARROW = {torch.narrow}


def _to(node, dtype=None) -> fx.Node | None:
    """The input of `node.to(dtype)` (any dtype when None)."""
    if not is_call(node, set(), "to"):
        return None
    target = arg(node, 1, "dtype")
    return node.args[0] if dtype is None or target == dtype else None


def _other(node: fx.Node, one) -> object:
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _eps(node):
    """A float constant, or the 0-d tensor Dynamo made of a module's float attribute under
    dynamic shapes (`item(placeholder)`); None for anything else."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if is_call(node, set(), "item") and isinstance(node.args[0], fx.Node):
        t = val(node.args[0])
        return node.args[0] if t is not None and t.dim() == 0 and t.is_floating_point() else None
    return None


def _rsqrt_of(hf: fx.Node, rs):
    """eps (see _eps) when rs = rsqrt(mean(hf ** 2, -1, keepdim=True) + eps), else None."""
    if not is_call(rs, {torch.rsqrt}, "rsqrt"):
        return None
    var_eps = rs.args[0]
    if not is_call(var_eps, ADD) or len(var_eps.args) != 2:
        return None
    mean, eps = var_eps.args
    if not is_call(mean, set(), "mean"):
        mean, eps = eps, mean
    eps = _eps(eps)
    if eps is None or not is_call(mean, set(), "mean"):
        return None
    dim, keep = arg(mean, 1, "dim"), mean.kwargs.get("keepdim", arg(mean, 2, "keepdim", False))
    sq = mean.args[0]
    if dim not in (-1, [-1], (-1,)) or not keep or not is_call(sq, {torch.pow, operator.pow}, "pow"):
        return None
    return eps if sq.args[0] is hf and arg(sq, 1, "exponent") == 2 else None


def match_rms_norm(n) -> tuple[fx.Node, fx.Node, object] | None:
    """(h, norm weight, eps: a float or a 0-d tensor node) when `n` is HF's RMSNorm of h, else None."""
    if not is_call(n, MUL) or len(n.args) != 2:
        return None
    for w, t in (n.args, n.args[::-1]):
        normed = _to(t)
        wv = val(w)
        if normed is None or wv is None or wv.dim() != 1 or not is_call(normed, MUL) or len(normed.args) != 2:
            continue
        for hf, rs in (normed.args, normed.args[::-1]):
            h = _to(hf, torch.float32)
            eps = _rsqrt_of(hf, rs) if h is not None else None
            if eps is not None and wv.dtype == val(h).dtype and wv.shape[0] == val(h).shape[-1]:
                return h, w, eps
    return None


def _gated_product(z: fx.Node) -> fx.Node | None:
    """The mul node of silu(narrow(z, -1, 0, I)) * narrow(z, -1, I, I), if z feeds only that."""
    users = list(z.users)
    n = val(z).shape[-1]
    if len(users) != 2 or not all(is_call(u, _NARROW) for u in users):
        return None
    pieces = {arg(u, 2, "start"): u for u in users}
    half = n // 2
    gate, up = pieces.get(0), pieces.get(half)
    if gate is None or up is None or any(arg(u, 1, "dim") not in (-1, val(z).dim() - 1) for u in users):
        return None
    if arg(gate, 3, "length") != half or arg(up, 3, "length") != half:
        return None
    act = single_user(gate)
    prod = single_user(act) if is_call(act, _SILU) and not act.kwargs.get("inplace", False) else None
    if prod is None or not is_call(prod, MUL) or set(prod.args[:2]) != {act, up} or single_user(up) is not prod:
        return None
    return prod


def _residual(h: fx.Node):
    """(x, residual) when h = add(residual, x) of two same-shape tensors, else (h, None)."""
    if is_call(h, ADD) and len(h.args) == 2 and not h.kwargs and all(isinstance(a, fx.Node) for a in h.args):
        r, x = h.args
        if same_size(val(r).shape, val(x).shape) and val(r).dtype == val(x).dtype:
            return x, r
    return h, None


class NormLinearPass:
    """Every RMSNorm that feeds exactly one bias-free linear becomes one `xyserve::norm_linear`."""

    name = "norm_linear"

    @staticmethod
    def uuid() -> str:
        return "xyserve.norm_linear.v1"

    def __call__(self, gm: fx.GraphModule, report: LoweringReport, impl: str) -> None:
        for node in list(gm.graph.nodes):
            if not is_call(node, LINEAR):
                continue
            norm = arg(node, 0, "input")
            found = match_rms_norm(norm)
            if found is None:
                continue
            if arg(node, 2, "bias") is not None or len(norm.users) != 1:
                why = "the linear has a bias" if arg(node, 2, "bias") is not None else "the norm feeds several nodes"
                report.skip("norm_linear", node, why, layer_of(node))
                continue
            self._fuse(gm, node, norm, found, report, impl)

    @staticmethod
    def _fuse(gm: fx.GraphModule, linear: fx.Node, norm: fx.Node, found, report: LoweringReport, impl: str) -> None:
        g = gm.graph
        h, w_norm, eps = found
        prod = _gated_product(linear)
        x, residual = _residual(h)
        chain = _chain(norm, h)  # before h's uses move to the fused node's output
        # The fused node goes where the linear is (its weight may be defined just before it, by the
        # sibling pass); h's other users must then all come later.
        order = {n: i for i, n in enumerate(g.nodes)}
        if any(order[u] < order[linear] for u in h.users if u not in chain):
            report.skip("norm_linear", linear, "the norm's input is used before the linear", layer_of(linear))
            return
        with g.inserting_before(linear):
            eps_t, eps_f = (eps, 0.0) if isinstance(eps, fx.Node) else (None, eps)
            args = (x, residual, w_norm, eps_t, eps_f, arg(linear, 1, "weight"), prod is not None, impl)
            fused = g.call_function(torch.ops.xyserve.norm_linear.default, args)
            fused.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
        with g.inserting_after(fused):
            out = g.call_function(operator.getitem, (fused, 0))
            new_h = g.call_function(operator.getitem, (fused, 1)) if residual is not None else None
        target = prod if prod is not None else linear
        out.meta.update(target.meta)
        target.replace_all_uses_with(out)
        if new_h is not None:
            new_h.meta.update(h.meta)
            h.replace_all_uses_with(new_h, delete_user_cb=lambda user: user is not fused)
        dead = [target, *target.all_input_nodes, *list(linear.users), linear] if prod is not None else [linear]
        prune(g, dead + chain + ([h] if residual is not None else []))
        report.rewrote("norm_linear_gated" if prod is not None else "norm_linear", fused, layer_of(fused))


def _chain(norm: fx.Node, h: fx.Node) -> list[fx.Node]:
    """The norm's own nodes between h and its output (pruned once orphaned; never h's inputs)."""
    seen, stack = [], [norm]
    while stack:
        n = stack.pop()
        if n in seen or n is h or n.op not in ("call_function", "call_method"):
            continue
        seen.append(n)
        stack.extend(a for a in n.all_input_nodes if a.op in ("call_function", "call_method"))
    return seen
