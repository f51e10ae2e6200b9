"""SDPA and HF eager attention  ->  xyserve::attention (dense, GQA-aware).

Patterns (Dynamo graph):

    sdpa:   scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale, enable_gqa)
    eager:  matmul(q, k.transpose(-2, -1)) [* s | / s] [+ mask] -> softmax(-1) [-> cast] [-> dropout(p=0)]
            -> matmul(., v)
    repeat_kv (on k and v of either):  x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv*n, L, D) -> x

Anything else that looks like attention (soft-capping, sinks, dropout, weights used elsewhere) is
left to Inductor and reported with the reason.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from lowering.patterns import (
    ADD, DIV, DROPOUT, MATMUL, MUL, SDPA, SOFTMAX, arg, is_call, layer_of, prune, same_size, single_user, val,
)
from lowering.report import LoweringReport

_REPEAT_INDEX = (slice(None), slice(None), None, slice(None), slice(None))


def unrepeat_kv(node: fx.Node) -> fx.Node | None:
    """The [B, Hkv, L, D] source of HF's repeat_kv(node), or None if `node` is not one."""
    if not is_call(node, {torch.reshape}, "reshape"):
        return None
    expand = node.args[0]
    if not is_call(expand, {torch.Tensor.expand}, "expand"):
        return None
    index = expand.args[0]
    if not (is_call(index, {operator.getitem}) and index.args[1] == _REPEAT_INDEX):
        return None
    src, out = val(index.args[0]), val(node)
    if src is None or out is None or src.dim() != 4 or out.dim() != 4:
        return None
    if not same_size((src.shape[0], *src.shape[2:]), (out.shape[0], *out.shape[2:])):
        return None
    return index.args[0]


def _is_last_two_transpose(node) -> bool:
    if not is_call(node, {torch.transpose}, "transpose"):
        return False
    v = val(node)
    if v is None:
        return False
    return {d % v.dim() for d in node.args[1:3]} == {v.dim() - 2, v.dim() - 1}


def is_scalar(x) -> bool:
    """A Python number, or a graph node holding a (symbolic) float: Dynamo turns float attributes
    such as HF's `self.scaling` into SymFloat inputs under dynamic shapes."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    return isinstance(x, fx.Node) and isinstance(val(x), (int, float, torch.SymFloat, torch.SymInt))


def _scale_of(node: fx.Node):
    """(scores_before_scale, scale) where node = scores * s or scores / s; else (node, 1.0)."""
    if is_call(node, MUL, "mul"):
        a, b = node.args[:2]
        if is_scalar(b) and isinstance(a, fx.Node) and not is_scalar(a):
            return a, b
        if is_scalar(a) and isinstance(b, fx.Node):
            return b, a
        return None, None
    if is_call(node, DIV, "div") and isinstance(node.args[1], (int, float)) and len(node.kwargs) == 0:
        return node.args[0], 1.0 / float(node.args[1])
    return node, 1.0


def _mask_of(node: fx.Node):
    """(scores, mask) for scores + mask with a float mask broadcast into the scores' shape."""
    if not is_call(node, ADD, "add") or len(node.args) != 2 or node.kwargs:
        return node, None
    scores, mask = node.args
    sv, mv, out = val(scores), val(mask), val(node)
    if sv is None or mv is None or not mv.is_floating_point() or not same_size(sv.shape, out.shape):
        return None, None
    return scores, mask


def _is_passthrough(node: fx.Node) -> bool:
    """Casts and no-op dropout between softmax and P.V."""
    if node.op == "call_method" and node.target in ("to", "type", "float", "half", "bfloat16"):
        rest = list(node.args[1:]) + list(node.kwargs.values())
        return all(isinstance(a, torch.dtype) for a in rest)
    if is_call(node, DROPOUT):
        return arg(node, 1, "p", 0.5) == 0 or arg(node, 2, "training", True) is False
    return False


def _variant_hint(softmax: fx.Node) -> str:
    """Name the unsupported attention variant feeding this softmax, for the report."""
    seen, todo = set(), [softmax.args[0]]
    while todo and len(seen) < 16:  # breadth first: the scores side is nearer than the mask's
        n = todo.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if is_call(n, {torch.tanh}, "tanh"):
            return "logit soft-capping (tanh) is not supported yet"
        if is_call(n, {torch.cat}, "cat"):
            return "attention sinks (concatenated logits) are not supported yet"
        todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return "unsupported attention variant"


def _match_eager(softmax: fx.Node):
    """Walk an HF eager attention around its softmax; returns the pieces or a reason string."""
    sv = val(softmax)
    dim = arg(softmax, 1, "dim")
    if sv is None or sv.dim() != 4 or dim not in (-1, 3):
        return "softmax is not over the last dim of a 4-D score tensor"
    scores, mask = _mask_of(softmax.args[0])
    if scores is None:
        return "mask is not an additive float mask of the scores' shape"
    mm, scale = _scale_of(scores)
    if mm is None or not is_call(mm, MATMUL, "matmul"):
        return "softmax input is not (Q.K^T [* scale] [+ mask]): " + _variant_hint(softmax)
    q, kt = mm.args[:2]
    if not _is_last_two_transpose(kt):
        return "Q.K^T does not transpose K's last two dims"
    inner = [n for n in (mm, kt, scores, softmax.args[0]) if isinstance(n, fx.Node)]
    if any(len(n.users) != 1 for n in inner):
        return "attention scores are used elsewhere"
    chain, cur = [], softmax
    while True:
        nxt = single_user(cur)
        if nxt is None:
            return "attention weights are used elsewhere (output_attentions?)"
        if _is_passthrough(nxt):
            chain.append(nxt)
            cur = nxt
            continue
        if is_call(nxt, MATMUL, "matmul") and nxt.args[0] is cur:
            break
        return "softmax output is not multiplied by V (or dropout p > 0)"
    k, v = kt.args[0], nxt.args[1]
    qv, kv, vv, ov = val(q), val(k), val(v), val(nxt)
    if None in (qv, kv, vv, ov) or not (qv.dtype == kv.dtype == vv.dtype == ov.dtype) or kv.dim() != 4:
        return "q/k/v/output dtypes differ"
    dead = [nxt, *chain, softmax, *inner]
    return dict(q=q, k=k, v=v, mask=mask, scale=scale, is_causal=False, out=nxt, dead=dead)


def _match_sdpa(node: fx.Node):
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    if arg(node, 4, "dropout_p", 0.0) != 0:
        return "dropout_p > 0"
    is_causal, scale = arg(node, 5, "is_causal", False), arg(node, 6, "scale")
    if not isinstance(is_causal, bool):
        return "is_causal is not a constant"
    if not (scale is None or is_scalar(scale)):
        return "scale is not a number"
    qv, kv = val(q), val(k)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        return "q/k are not 4-D [B, H, S, D]"
    return dict(q=q, k=k, v=v, mask=mask, scale=scale, is_causal=is_causal, out=node, dead=[node])


class AttentionPass:
    """SDPA and eager attention become one `xyserve::attention` (meta-attention on GPU)."""

    name = "attention"

    @staticmethod
    def uuid() -> str:
        return "xyserve.attention.v1"

    def __call__(self, gm: fx.GraphModule, report: LoweringReport, impl: str) -> None:
        # A rewrite erases only its own chain (nodes after the anchor, and repeat_kv nodes), never
        # another SDPA / softmax anchor, so walking a snapshot of the nodes is safe.
        for node in list(gm.graph.nodes):
            if is_call(node, SDPA):
                pattern, found = "sdpa", _match_sdpa(node)
            elif is_call(node, SOFTMAX, "softmax"):
                pattern, found = "eager_attention", _match_eager(node)
            else:
                continue
            if isinstance(found, str):
                report.skip("attention", node, found, layer_of(node))
                continue
            self._rewrite(gm, report, pattern, found, impl)

    @staticmethod
    def _rewrite(gm: fx.GraphModule, report: LoweringReport, pattern: str, m: dict, impl: str) -> None:
        dead = list(m["dead"])
        for name in ("k", "v"):
            src = unrepeat_kv(m[name])
            if src is not None:
                dead += [m[name], m[name].args[0], m[name].args[0].args[0]]
                m[name] = src
                report.rewrote("repeat_kv", src, layer_of(m["out"]))
        scale = float(m["scale"]) if isinstance(m["scale"], (int, float)) else m["scale"]  # None or a SymFloat node
        args = (m["q"], m["k"], m["v"], m["mask"], scale, m["is_causal"], impl)
        out = m["out"]
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.ops.xyserve.attention.default, args)
        new.meta.update(out.meta)
        out.replace_all_uses_with(new)
        prune(gm.graph, dead)
        report.rewrote(pattern, new, layer_of(new))
