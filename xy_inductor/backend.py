"""The `xyserve` torch.compile backend.

    torch.compile(model, backend="xyserve")          # found through the torch_dynamo_backends entry point
    torch.compile(model, backend="xyserve", options={"impl": "reference", "inductor_config": {...}})

The Dynamo (torch-level) graph is rewritten first: there SDPA still has its meaning (is_causal,
scale, GQA) and GPT-2's Conv1D is still an addmm with a [K, N] weight. Inductor's compile_fx then
compiles everything, our custom ops included (they are opaque calls with fake implementations).
"""
from __future__ import annotations

import functools
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


def lowered_here(flag: bool | None, on_cuda: bool, patches: dict[str, Any]) -> bool:
    """`lower_attention` / `lower_gemm`, with None ("auto") resolved: on a GPU the ops are lowered
    only when Inductor replays the graph in CUDA graphs. Launched eagerly, each one pays its
    launcher's Python (planning, argument checks, the launch) on every call: ~170 us for a dense
    attention call against ~26 us for SDPA on an H100 host, for the same GPU time at decode; HF
    generate of a 1B model ran at half Inductor's speed with them (benchmarks/RESULTS.md)."""
    if flag is not None:
        return flag
    return not on_cuda or bool(patches.get("triton.cudagraphs"))


@functools.cache
def _say_ops_stay_unlowered(ops: str) -> None:
    """Once per process and set of ops: the fallback is the default on a GPU without CUDA graphs,
    so one line, not one per graph. `ops`: what stays, e.g. "attention (SDPA) and linears (cuBLAS)"."""
    log.warning("xyserve: %s stay unlowered here: no CUDA graphs replay the compiled graph, and launched eagerly "
                "xyserve's kernels cost more host time than they save. mode='reduce-overhead' lowers them; "
                "options={'lower_attention': True, 'lower_gemm': True} forces them.", ops)


def needs_grad(gm: fx.GraphModule, example_inputs: list) -> bool:
    """AOTAutograd's test for tracing a backward: grad mode on and an input (parameters included,
    whether lifted to inputs or kept as attributes) that requires grad."""
    if not torch.is_grad_enabled():
        return False
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    return any(t.requires_grad for t in (*tensors, *gm.parameters()))


@functools.cache
def _say_training_stays_on_inductor() -> None:
    log.warning("xyserve: this graph needs gradients (grad mode on, inputs that require grad) and xyserve's "
                "kernels are inference-only, so Inductor compiles it alone; run the model under torch.no_grad() "
                "or torch.inference_mode() to use them.")


def xyserve(
    gm: fx.GraphModule,
    example_inputs: list,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable:
    """Lower attention and linear nodes to xyserve ops, then hand the graph to Inductor."""
    opts = CompileOptions.from_options(options)
    patches = _inductor_patches(mode, opts)
    if needs_grad(gm, example_inputs):
        _say_training_stays_on_inductor()
        _REPORTS.append(LoweringReport())
        return _compile_rest(gm, example_inputs, opts, patches)
    fuse = example_inputs if opts.fuse_sibling_linears else None
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    lower_attention = lowered_here(opts.lower_attention, on_cuda, patches)
    lower_gemm = lowered_here(opts.lower_gemm, on_cuda, patches)
    auto = (("attention (SDPA)", opts.lower_attention, lower_attention), ("linears (cuBLAS)", opts.lower_gemm, lower_gemm))
    stay = [what for what, flag, lowered in auto if flag is None and not lowered]
    if stay:
        _say_ops_stay_unlowered(" and ".join(stay))
    report = lower(gm, lower_attention, lower_gemm, opts.impl, fuse, opts.share_tables, opts.fuse_norm_linear)
    _REPORTS.append(report)
    for s in report.skipped:
        log.warning("xyserve: %s node %s left to Inductor: %s", s.what, s.node, s.reason)
    return _compile_rest(gm, example_inputs, opts, patches)


def _compile_rest(gm: fx.GraphModule, example_inputs: list, opts: CompileOptions, patches: dict[str, Any]) -> Callable:
    if not opts.use_inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches)


xyserve.uuid = uuid  # type: ignore[attr-defined]
