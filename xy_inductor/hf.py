"""The "xyserve" attention implementation for Hugging Face transformers.

`register()` adds it to transformers' AttentionInterface (the attention call of every layer) and
AttentionMaskInterface (returns None: the engine's kernels know each request's extent from
cu_seqlens_q / seq_lens, so no [T, T] mask is built; without this entry transformers may build a
mask, or drop padding, behind our back). The engine packs a whole mixed step as batch 1, passes
its attention metadata as the `xyserve_metadata` forward kwarg, and transformers hands that kwarg
through every decoder layer down to `xyserve_attention_forward`.
"""
from __future__ import annotations

import torch

ATTN_IMPLEMENTATION = "xyserve"
METADATA_KWARG = "xyserve_metadata"

# Attention extras that change the math in ways the paged kernels do not implement.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


def xyserve_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, Hq, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, Dv]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:  # ([1, T, Hq, Dv], no weights)
    metadata = kwargs.get(METADATA_KWARG)
    if metadata is None:
        raise RuntimeError(
            "xyserve: this model uses attn_implementation='xyserve', which only runs inside the xyserve "
            "engine (it needs the paged-KV metadata); call model.set_attn_implementation('sdpa') to use it alone"
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"xyserve: attention with {name}={kwargs[name]!r} is not supported")
    window = kwargs.get("sliding_window")
    if window is not None and window < metadata.max_model_len:
        raise NotImplementedError(
            f"xyserve: sliding-window attention (window {window} < max_model_len {metadata.max_model_len}) "
            "is not supported; set max_model_len <= the window to run it as full attention"
        )
    if attention_mask is not None:
        raise RuntimeError("xyserve: the model built an attention mask the paged kernels would ignore")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise NotImplementedError(
            f"xyserve: {type(module).__name__} has no layer_idx, so its KV cache layer is unknown"
        )
    if query.shape[0] != 1:
        raise ValueError(f"xyserve: the engine packs a step as batch 1, got batch {query.shape[0]}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = metadata.attend(layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scale)
    return out.unsqueeze(0), None


def xyserve_mask(*args, **kwargs) -> None:
    """No mask: request boundaries and causality come from the attention metadata."""
    return None


def register() -> None:
    """Make attn_implementation="xyserve" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, xyserve_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, xyserve_mask)
