"""ModelCheck: prove a model can be served through the "xyserve" attention before serving it.

The check runs a short causal sequence twice: with the model's own attention, and with
attn_implementation="xyserve" where a probe stands in for the paged kernels (plain causal SDPA
over the same tokens). It records what each attention layer receives (layer index, KV heads,
head size, dtype) and fails loudly when a layer is never routed through the interface, is routed
twice, or when the two runs disagree: such a model would give wrong tokens in the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xy_inductor import hf


@dataclass(slots=True)
class LayerSpec:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype


@dataclass(eq=False)
class AttentionProbe:
    """Stands in for PagedAttentionMetadata during the check: records layers, attends densely."""

    max_model_len: int
    calls: list[tuple[int, LayerSpec]] = field(default_factory=list)

    def attend(self, layer_idx, query, key, value, scale):
        spec = LayerSpec(query.shape[1], key.shape[1], key.shape[2], value.shape[2], key.dtype)
        self.calls.append((layer_idx, spec))
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, H, T, D]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out[0].transpose(0, 1)


def _refuse_config(config) -> None:
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"xyserve: encoder-decoder models ({name}) are not supported")
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, attr, None):
            raise NotImplementedError(f"xyserve: {name} uses {attr}, which the paged kernels do not implement")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        raise NotImplementedError(f"xyserve: {name} uses ALiBi, which the paged kernels do not implement")


def _logits(model, input_ids, **kwargs) -> torch.Tensor:
    return model(input_ids=input_ids, position_ids=torch.arange(input_ids.shape[1], device=input_ids.device)[None],
                 use_cache=False, **kwargs).logits.float()


@torch.inference_mode()
def check_model(model: torch.nn.Module, max_model_len: int, num_tokens: int = 8) -> list[LayerSpec]:
    """Switch `model` to attn_implementation="xyserve" and return one LayerSpec per layer index."""
    config = model.config
    _refuse_config(config)
    hf.register()
    device = next(model.parameters()).device
    vocab = config.vocab_size
    input_ids = torch.randint(0, vocab, (1, num_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    if config._attn_implementation == hf.ATTN_IMPLEMENTATION:  # an earlier engine switched it
        model.set_attn_implementation("sdpa")
    own_impl = config._attn_implementation
    expected = _logits(model, input_ids)
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    if config._attn_implementation != hf.ATTN_IMPLEMENTATION:
        raise NotImplementedError(
            f"xyserve: {type(model).__name__} cannot switch its attention implementation (it does not use "
            "transformers' AttentionInterface)"
        )
    probe = AttentionProbe(max_model_len)
    try:
        got = _logits(model, input_ids, **{hf.METADATA_KWARG: probe})
    except Exception:
        model.set_attn_implementation(own_impl)
        raise
    layers = sorted({i for i, _ in probe.calls})
    name = type(model).__name__
    if not probe.calls or layers != list(range(len(layers))) or len(probe.calls) != len(layers):
        model.set_attn_implementation(own_impl)
        raise NotImplementedError(
            f"xyserve: {name} does not route each attention layer once through transformers' AttentionInterface "
            f"with a layer_idx (saw layer indices {[i for i, _ in probe.calls]}); its tokens would be wrong"
        )
    scale = expected.abs().max().clamp_min(1e-6)
    if ((got - expected).abs().max() / scale).item() > 2e-2:
        model.set_attn_implementation(own_impl)
        raise NotImplementedError(
            f"xyserve: {name} gives different logits through the xyserve attention than with its own "
            f"({own_impl}) attention: it does something the paged kernels do not model"
        )
    specs = dict(probe.calls)
    return [specs[i] for i in layers]
