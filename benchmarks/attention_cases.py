"""Batches, inputs and correctness checks of the attention benchmark (GPU).

Llama-3-8B heads (32 q / 8 kv, d 128) over a paged cache of 16-token blocks in shuffled order;
float64 oracles; every check records its error (or the exception it raised) so the timings still
run and the report names what failed.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ascend_kernels import attention, reference

HQ, HKV, D, PAGE = 32, 8, 128, 16
SCALE = 1 / math.sqrt(D)
DEV = "cuda"


def batch_specs(name: str, rng: random.Random) -> list[tuple[int, int]]:
    """(q_len, kv_len) per request."""
    if name == "mixed":
        return ([(512, 512 + rng.randint(512, 2560)) for _ in range(4)] + [(1, rng.randint(512, 4096)) for _ in range(48)]
                + [(5, rng.randint(512, 4096)) for _ in range(4)])
    if name == "prefill":
        return [(2048, 2048)] * 4
    if name == "decode":
        return [(1, rng.randint(512, 4096)) for _ in range(64)]
    if name == "verify":
        return [(5, rng.randint(512, 4096)) for _ in range(32)]
    if name == "long_decode":  # few tasks: exercises split-KV
        return [(1, 16384), (1, 8192)]
    raise ValueError(name)


def make_inputs(specs, dtype=torch.bfloat16, hq=HQ, hkv=HKV, d=D, page=PAGE, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    blocks = [-(-kv // page) for _, kv in specs]
    perm = torch.randperm(sum(blocks), device=DEV, generator=gen).to(torch.int32)
    block_table = torch.zeros(len(specs), max(blocks), dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(blocks):
        block_table[b, :n] = perm[used:used + n]
        used += n
    kc = torch.randn(sum(blocks), page, hkv, d, device=DEV, generator=gen, dtype=dtype)
    vc = torch.randn(sum(blocks), page, hkv, d, device=DEV, generator=gen, dtype=dtype)
    q = torch.randn(sum(s[0] for s in specs), hq, d, device=DEV, generator=gen, dtype=dtype)
    cu = torch.tensor([0] + [sum(s[0] for s in specs[:i + 1]) for i in range(len(specs))], dtype=torch.int32, device=DEV)
    lens = torch.tensor([s[1] for s in specs], dtype=torch.int32, device=DEV)
    return q, kc, vc, cu, lens, block_table


def oracle64(q, kc, vc, cu, lens, bt, tree=None):
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    group = q.shape[1] // kc.shape[2]
    for b in range(len(lens)):
        s, e, kv = int(cu[b]), int(cu[b + 1]), int(lens[b])
        k = reference.gather_kv(kc, bt[b], kv).double().repeat_interleave(group, 1).transpose(0, 1)
        v = reference.gather_kv(vc, bt[b], kv).double().repeat_interleave(group, 1).transpose(0, 1)
        vis = torch.ones(e - s, kv, dtype=torch.bool, device=q.device).tril(kv - (e - s))
        if tree is not None:
            vis[:, kv - (e - s):] = tree[s:e, :e - s]
        out[s:e] = F.scaled_dot_product_attention(q[s:e].double().transpose(0, 1), k, v, attn_mask=vis,
                                                  scale=1 / math.sqrt(q.shape[-1])).transpose(0, 1)
    return out


def rel_err(out, ref) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


# max error relative to max |ref| a case may show against float64 (a case's name carries its dtype)
CORRECTNESS_TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4, "mismatches": 0.0}


def _case(res: dict, name: str, fn) -> None:
    """Record one check; an exception (a kernel that fails to compile) is recorded, not raised,
    so the timings still run, and `failed_checks` names the case."""
    try:
        res[name] = fn()
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        res[name] = f"error: {type(e).__name__}: {e}"[:300]


def failed_checks(res: dict) -> list[str]:
    """Cases that raised or exceed their dtype's tolerance."""
    bad = []
    for name, value in res.items():
        tol = next((t for key, t in CORRECTNESS_TOL.items() if key in name), None)
        if isinstance(value, str) or tol is None or not value <= tol:
            bad.append(name)
    return bad


def correctness() -> dict:
    """Max error relative to max |ref| against float64, per case."""
    res, rng = {}, random.Random(1)
    cases = [("mixed_small_bf16", [(100, 400), (37, 37)] + [(1, rng.randint(1, 900)) for _ in range(6)] + [(5, 300)],
              torch.bfloat16, HQ, HKV, D, 16),
             ("long_decode_split_bf16", [(1, 5000), (2, 3000)], torch.bfloat16, HQ, HKV, D, 16),
             ("fp16_d64_mha_page32", [(70, 200), (1, 333), (4, 90)], torch.float16, 8, 8, 64, 32),
             ("fp32_d80_gqa8", [(50, 120), (1, 77)], torch.float32, 16, 2, 80, 16),
             ("bf16_d256", [(40, 100), (1, 500)], torch.bfloat16, 8, 2, 256, 16),
             ("bf16_d96", [(40, 100), (1, 500)], torch.bfloat16, 8, 4, 96, 16),
             # prefills only: the Gluon prefill kernel on an sm_90 GPU (prefill_hopper.py), else the meta-kernel
             ("prefills_bf16", [(300, 300), (128, 1000), (200, 333), (1000, 2077)], torch.bfloat16, HQ, HKV, D, 16),
             ("prefills_fp16_d64_mha_page32", [(129, 129), (256, 700)], torch.float16, 8, 8, 64, 32)]
    for name, specs, dtype, hq, hkv, d, page in cases:
        args = make_inputs(specs, dtype, hq, hkv, d, page)
        _case(res, name, lambda args=args, d=d: rel_err(attention.paged_attention(
            *args, 1 / math.sqrt(d), out=torch.full_like(args[0], float("nan"))), oracle64(*args)))
    args = make_inputs([(5, 300), (4, 40), (1, 70)])
    tree = torch.ones(10, 8, dtype=torch.bool, device=DEV).tril()
    tree[2, 1] = tree[8, 0] = False  # branches: token 2 skips 1, the second request's last skips 0
    _case(res, "tree_verify_bf16", lambda: rel_err(
        attention.paged_attention(*args, 1 / math.sqrt(args[0].shape[-1]), tree), oracle64(*args, tree)))
    from ascend_kernels import kv_store

    kc, vc = args[1].clone(), args[2].clone()
    slots = torch.randperm(kc.shape[0] * kc.shape[1], device=DEV)[:args[0].shape[0]]
    slots[3] = -1
    new_k, new_v = (torch.randn(args[0].shape[0], HKV, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    reference.store_kv(new_k, new_v, args[1], args[2], slots)

    def store_mismatches() -> float:
        kv_store.store_kv(new_k, new_v, kc, vc, slots)
        return float((kc != args[1]).sum() + (vc != args[2]).sum())

    _case(res, "store_kv_mismatches", store_mismatches)
    q = torch.randn(2, HQ, 300, D, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(2, HKV, 300, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    pad = torch.ones(2, 1, 300, 300, dtype=torch.bool, device=DEV).tril()
    pad[1, ..., :50] = False
    for label, mask, causal in (("dense_causal_bf16", None, True), ("dense_padmask_bf16", pad, False)):
        ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(4, 1),
                                             v.double().repeat_interleave(4, 1), attn_mask=mask, is_causal=causal)
        _case(res, label, lambda mask=mask, causal=causal, ref=ref: rel_err(
            attention.dense_attention(q, k, v, mask, None, causal), ref.nan_to_num()))
    return res
