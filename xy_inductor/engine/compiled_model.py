"""CompiledModel: the engine's model forward, under torch.compile when the config asks for it.

For the "xyserve" backend the engine owns the model's weights: it packs q/k/v and gate/up back to
back (weight_packing.py) so the backend fuses each group into one GEMM, and keeps linears on cuBLAS
unless `compile_options` asks for SmoothGEMM.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx.experimental import _config as shape_config

from xy_inductor.config import EngineConfig
from xy_inductor.engine.weight_packing import PackedWeights, pack_sibling_linears


def _backend(name: str):
    from torch._dynamo.backends.registry import lookup_backend

    try:
        lookup_backend(name)  # fail now, not at the first step
    except Exception:
        if name != "xyserve":
            raise
        # Not pip-installed (no entry point): the backend function itself works as well.
        from xy_inductor.backend import xyserve

        return xyserve
    return name


def _options(model: torch.nn.Module, config: EngineConfig,
             device: torch.device) -> tuple[dict | None, PackedWeights | None]:
    options = config.compile_options
    if config.compile_backend != "xyserve":
        return options, None
    # Measured on an H200 (benchmarks/RESULTS.md): inside the engine SmoothGEMM's per-call host
    # cost outweighs its gains today, so linears stay on cuBLAS unless asked (`{}`: the engine
    # replays its own CUDA graphs, which the backend's "auto" cannot see, so it says True itself;
    # the same for attention the model computes densely, e.g. a draft model's).
    options = {"lower_gemm": False} if options is None else {"lower_gemm": True, **options}
    options.setdefault("lower_attention", True)
    options.setdefault("fuse_sibling_linears", True)
    if device.type == "cuda":
        # Inductor's combo kernels launch independent small kernels as one: a decode step's q and
        # k RoPE kernels become one launch per layer (Llama-3.2-1B on an H200: graph replay
        # 1.195 -> 1.170 ms at batch 1, 1.256 -> 1.228 ms at batch 16). A caller's own
        # inductor_config wins.
        inductor = dict(options.get("inductor_config") or {})
        inductor.setdefault("combo_kernels", True)
        options["inductor_config"] = inductor
    packed = pack_sibling_linears(model) if options["fuse_sibling_linears"] else None
    return options, packed


def compile_model(model: torch.nn.Module, config: EngineConfig,
                  device: torch.device) -> tuple[Callable, PackedWeights | None]:
    """The step forward (the model itself when not compiling) and the packed weights, if any."""
    use = config.compile if config.compile is not None else device.type == "cuda"
    if not use:
        return model, None
    backend = _backend(config.compile_backend)
    options, packed = _options(model, config, device)
    compiled = torch.compile(model, backend=backend, dynamic=True, options=options)

    def forward(**kwargs):
        # Without duck sizing: sizes that happen to be equal on the first call (e.g. request
        # slots and block-table columns) must not be guarded equal, or the next step recompiles.
        with shape_config.patch(use_duck_shape=False):
            return compiled(**kwargs)

    return forward, packed
