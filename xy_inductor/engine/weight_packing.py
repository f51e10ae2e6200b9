"""Lay sibling projections (q/k/v, gate/up) out back to back in one storage, in place.

    before: Wq ─ its own storage   Wk ─ its own   Wv ─ its own
    after:  one storage [ Wq | Wk | Wv ]; q_proj.weight, k_proj.weight, v_proj.weight are views

Modules, parameter objects, names and values stay as they were (state_dict is unchanged, eager
runs as before); only where the numbers live changes. The backend's sibling-linear pass then
reads the three as one [Nq + Nk + Nv, K] matrix: one GEMM per group instead of three (or two).

A packed model's parameters share storage: `save_pretrained` still writes a normal checkpoint
(tested), but `safetensors.torch.save_file` on its raw state_dict refuses shared tensors (clone them
first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Sibling projections that read the same input in HF decoders (Llama, Mistral, Qwen2/3, Gemma...).
SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(slots=True)
class PackedWeights:
    """Where each packed parameter lives (module, attribute, address), to notice a weight that was
    swapped afterwards: the module's attribute then names another tensor."""

    slots: list[tuple[nn.Module, str, int]]

    @property
    def num_params(self) -> int:
        return len(self.slots)

    def check(self) -> None:
        for module, name, ptr in self.slots:
            if getattr(module, name).data_ptr() != ptr:
                raise RuntimeError(
                    "xyserve: a packed projection weight was replaced by a new tensor after the engine was "
                    "built; the compiled model reads the old layout. Update weights in place (copy_, "
                    "load_state_dict) or build a new LLM."
                )


def _group(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    linears = [getattr(module, n, None) for n in names]
    if not all(type(m) is nn.Linear for m in linears):
        return None
    w0 = linears[0].weight
    same = all(
        m.in_features == linears[0].in_features and m.weight.dtype == w0.dtype and m.weight.device == w0.device
        and (m.bias is None) == (linears[0].bias is None)
        for m in linears
    )
    return linears if same else None


def _packed(tensors: list[torch.Tensor]) -> bool:
    """Already back to back in one storage (a second engine on the same model must not move them:
    the first one's compiled graph reads them where they are)."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        if t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _pack(tensors: list[torch.Tensor]) -> None:
    if _packed(tensors):
        return
    with torch.no_grad():
        whole = torch.cat([t.detach() for t in tensors])
        start = 0
        for t in tensors:
            t.data = whole[start : start + t.shape[0]]
            start += t.shape[0]


def pack_sibling_linears(model: nn.Module, siblings=SIBLINGS) -> PackedWeights:
    """Pack every sibling group of plain nn.Linear layers found in `model`; returns what moved."""
    seen: set[int] = set()
    slots: list[tuple[nn.Module, str, int]] = []
    for module in model.modules():
        for names in siblings:
            linears = _group(module, names)
            if linears is None:
                continue
            attrs = ["weight"] + (["bias"] if linears[0].bias is not None else [])
            if any(id(getattr(m, a)) in seen for m in linears for a in attrs):  # shared: leave alone
                continue
            for a in attrs:
                _pack([getattr(m, a) for m in linears])
                seen.update(id(getattr(m, a)) for m in linears)
                slots += [(m, a, getattr(m, a).data_ptr()) for m in linears]
    return PackedWeights(slots)
