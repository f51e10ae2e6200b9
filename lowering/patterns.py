"""Small helpers to read Dynamo (torch-level) FX nodes: which call a node is, its arguments.

Dynamo graphs keep the Python-level callables (`torch._C._nn.linear`, `operator.mul`,
`Tensor.transpose` as call_method), so one logical op can appear under a few spellings.
"""
from __future__ import annotations

import contextlib
import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

LINEAR = {torch._C._nn.linear, F.linear}
ADDMM = {torch.addmm}
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
MATMUL = {torch.matmul, operator.matmul}
MUL = {operator.mul, torch.mul}
DIV = {operator.truediv, torch.div}
ADD = {operator.add, torch.add}
SOFTMAX = {F.softmax, torch.softmax}
DROPOUT = {F.dropout}

def is_call(node: Any, targets: set, method: str | None = None) -> bool:
    """True when `node` calls one of `targets` (call_function) or the tensor method `method`."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method" and method is not None:
        return node.target == method
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any):
    """The fake tensor Dynamo recorded for a node (None for constants / missing meta)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def set_fake_value(node: fx.Node, fn, args) -> None:
    """A new node's fake value, fn over its arguments' fake values, computed without adding
    guards: Dynamo turns every guard the shape env records before the graph is compiled into a
    guard of the graph, and running a linear on fake CUDA tensors guarded the token count to a
    constant (seen on torch 2.11: one graph per CUDA-graph bucket)."""
    fake = [val(a) if isinstance(a, fx.Node) else a for a in args]
    mode = next(f.fake_mode for f in fake if hasattr(f, "fake_mode"))
    quiet = mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext()
    with mode, quiet:
        node.meta["example_value"] = fn(*fake)


def same_size(a, b) -> bool:
    """Shape equality that never adds guards on symbolic sizes (compares the expressions)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(str(x) == str(y) for x, y in zip(a, b))


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


_LAYER = re.compile(r"(?:layers|layer|h|blocks|block)(?:\.|\[|_modules_|\]\.|_)(\d+)")


def layer_of(node: fx.Node) -> int | None:
    """Decoder layer index from the node's module stack (e.g. `model.layers[3].self_attn`)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        m = _LAYER.search(str(path))
        if m:
            return int(m.group(1))
    return None


def prune(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the given nodes once they have no users (never a graph-wide dead code pass:
    that would delete in-place cache updates such as `index_copy_`)."""
    pending = list(dict.fromkeys(nodes))
    while True:
        dead = [n for n in pending if not n.users and n.op in ("call_function", "call_method")]
        if not dead:
            return
        for n in dead:
            graph.erase_node(n)
            pending.remove(n)
