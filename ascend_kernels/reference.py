"""Pure-torch oracles for every meta-kernel: the CPU path and the test reference.

Paged KV cache layout (K and V alike)::

    k_cache[num_blocks, block_size, num_kv_heads, head_dim]
             │           └─ token slot inside a block
             └─ physical block id, found through block_table[request, logical_block]

    slot = block_table[req, pos // block_size] * block_size + pos % block_size
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_kn: bool) -> torch.Tensor:
    """y = x @ W^T + b for an HF Linear weight [N, K]; y = x @ W + b for a Conv1D weight [K, N]."""
    if not weight_kn:
        return F.linear(x, weight, bias)
    k, n = weight.shape
    x2d = x.reshape(-1, k)
    out = torch.addmm(bias, x2d, weight) if bias is not None else torch.mm(x2d, weight)
    return out.reshape(*x.shape[:-1], n)


def norm_linear(
    x: torch.Tensor,  # [..., K]
    residual: torch.Tensor | None,  # [..., K] or None
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]; gated: [2N, K] (gate rows, then up rows)
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (out [..., N], x + residual or None)
    """HF's decoder-layer chain in its eager order: h = x + residual; a = w * rmsnorm(h) (normalised
    in fp32, rounded to the model dtype, then scaled); out = a @ W^T, or SiLU(gate) * up."""
    h = x + residual if residual is not None else x
    hf = h.to(torch.float32)
    a = norm_weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return gated_linear(a, weight, gated), (h if residual is not None else None)


def gated_linear(a: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    """a @ W^T, or with `gated` (W = [W_gate; W_up]) SiLU(a @ W_gate^T) * (a @ W_up^T)."""
    y = F.linear(a, weight)
    if not gated:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def dense_attention(
    q: torch.Tensor,  # [B, Hq, S, D]
    k: torch.Tensor,  # [B, Hkv, L, D]
    v: torch.Tensor,  # [B, Hkv, L, Dv]
    mask: torch.Tensor | None,  # bool (True = keep) or additive float, broadcastable to [B, Hq, S, L]
    scale: float | None,
    is_causal: bool,
) -> torch.Tensor:  # [B, Hq, S, Dv]
    """SDPA semantics (causal mask aligned top-left), GQA by head-count ratio."""
    enable_gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


def store_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int; a negative slot is skipped (padding row)
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value[keep].to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` tokens of one request, [seq_len, Hkv, D], read through its block row."""
    block_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    blocks = block_row.long()[pos // block_size]
    return cache[blocks, pos % block_size]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] packed query tokens of all requests
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32: KV length per request, new tokens included
    block_table: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [T, max_q] bool, see below
) -> torch.Tensor:  # [T, Hq, D]
    """Mixed prefill / chunked prefill / decode / verify attention over a paged cache.

    Query token i of a request with q_len new tokens sits at position seq_len - q_len + i and sees
    every KV position up to its own (causal, offset by the cached prefix). With `tree_mask`, the
    q_len x q_len corner is given explicitly instead: token i sees new token j iff tree_mask[t, j]
    (t = the packed row of token i); positions before the new tokens stay fully visible.
    """
    out = torch.zeros(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    group = q.shape[1] // k_cache.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math for half types, fp64 stays fp64
    for b in range(len(lens)):
        start, end, kv_len = cu[b], cu[b + 1], lens[b]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_table[b], kv_len).repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_table[b], kv_len).repeat_interleave(group, dim=1)
        qpos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        visible = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]
        if tree_mask is not None:
            visible[:, kv_len - q_len :] = tree_mask[start:end, :q_len]
        scores = torch.einsum("qhd,khd->hqk", q[start:end].to(acc), k.to(acc)) * scale
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v.to(acc)).to(q.dtype)
    return out


def decode_step(w, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, pos: int,
                token: int) -> torch.Tensor:
    """The whole-step decode kernel's oracle (decode_step_kernel.py), in float32: one batch-1 step of a
    Llama-style decoder over stacked weights `w` (decode_step.DecodeWeights) and stacked paged caches
    [num_layers, num_blocks, block_size, num_kv_heads, head_dim]. Stores the token's K/V at `pos` (the
    cache's dtype) and attends to it unrounded, as the kernel does; returns the logits [V]."""
    nq, nkv, hd = w.num_q_heads, w.num_kv_heads, w.head_dim
    nl, h, i = w.dims["NL"], w.dims["H"], w.dims["I"]
    bs, nqkv = k_cache.shape[2], (nq + 2 * nkv) * hd
    ang = pos * w.inv_freq.float()
    cos, sin = torch.cat([ang.cos(), ang.cos()]) * w.rope_scale, torch.cat([ang.sin(), ang.sin()]) * w.rope_scale

    def rope(t):  # [heads, hd], rotate-half form
        return t * cos + torch.cat([-t[:, hd // 2:], t[:, : hd // 2]], dim=-1) * sin

    def rms(t, g):
        return g.float() * t * torch.rsqrt(t.pow(2).mean() + w.eps)

    positions = torch.arange(pos + 1)
    slots = block_table[positions // bs].long().cpu() * bs + positions % bs
    x = w.embed[token].float()
    for layer in range(nl):
        qkv = w.wq[layer * nqkv:(layer + 1) * nqkv].float() @ rms(x, w.n1[layer])
        q = rope(qkv[: nq * hd].view(nq, hd))
        k, v = rope(qkv[nq * hd:(nq + nkv) * hd].view(nkv, hd)), qkv[(nq + nkv) * hd:].view(nkv, hd)
        k_flat, v_flat = k_cache[layer].view(-1, nkv, hd), v_cache[layer].view(-1, nkv, hd)
        k_flat[slots[-1]], v_flat[slots[-1]] = k.to(k_cache.dtype), v.to(v_cache.dtype)
        keys, values = k_flat[slots].float(), v_flat[slots].float()
        keys[-1], values[-1] = k, v
        keys, values = keys.repeat_interleave(nq // nkv, dim=1), values.repeat_interleave(nq // nkv, dim=1)
        probs = (torch.einsum("hd,thd->ht", q, keys) / hd**0.5).softmax(dim=-1)
        x = x + w.wo[layer * h:(layer + 1) * h].float() @ torch.einsum("ht,thd->hd", probs, values).reshape(-1)
        gu = w.wg[layer * 2 * i:(layer + 1) * 2 * i].float() @ rms(x, w.n2[layer])
        x = x + (F.silu(gu[:i]) * gu[i:]) @ w.wd[layer * i:(layer + 1) * i].float()  # wd: W_down transposed
    return w.wl.float() @ rms(x, w.nf)
