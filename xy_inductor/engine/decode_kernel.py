"""Decode steps as one persistent launch (opt-in: `EngineConfig.decode_megakernel`).

A step whose only row is one request decoding one token (no drafts) skips the compiled model: the
whole-step kernel (ascend_kernels/decode_step_kernel.py) reads the token id, its position and the
request's block table from the step's device buffers, writes the token's K/V into the paged cache
and returns the logits for the sampler (with their argmax, which greedy rows take as is). A decode
burst (ScheduledRequest.num_steps, EngineConfig.decode_burst) replays several launches back to back.
A kernel that takes several rows (DecodeKernelPath.max_rows) also runs steps of up to that many decodes.
Every other step (prefill chunks, larger batches, verification) runs the compiled model on the same cache.

The kernel streams each kind of weight through one TMA descriptor, so the weights are copied once,
stacked over the layers (the model's own stay where they are: the other steps use them). It takes
Llama-style decoders only (RMSNorm, RoPE, GQA without biases, SiLU-gated MLP); for anything else,
or a card or dtype it cannot run, the engine logs why once and keeps its normal path.
"""
from __future__ import annotations

import logging

import torch

from ascend_kernels.decode_step import (
    DecodeStepKernel,
    DecodeWeights,
    card_problem,
    problem,
)
from xy_inductor import hf

log = logging.getLogger("xyserve")

_STATIC_ROPE = ("default", "llama3", "linear")  # inv_freq fixed at load time (dynamic types change it)


def _check_llama_style(model: torch.nn.Module) -> None:
    """Raise NotImplementedError naming the first part that is not Llama-style."""
    inner, c = getattr(model, "model", None), model.config
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise NotImplementedError(f"{type(model).__name__} is not a Llama-style decoder (model.layers, rotary_emb)")
    if getattr(c, "hidden_act", None) != "silu":
        raise NotImplementedError(f"activation {getattr(c, 'hidden_act', None)!r} (the kernel takes SiLU)")
    if getattr(inner.rotary_emb, "rope_type", "default") not in _STATIC_ROPE:
        raise NotImplementedError(f"RoPE type {inner.rotary_emb.rope_type!r}")
    for layer in inner.layers:
        att, mlp = layer.self_attn, layer.mlp
        linears = [getattr(att, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(lin is None or getattr(lin, "bias", None) is not None for lin in linears):
            raise NotImplementedError("attention / MLP projections must be bias-free q/k/v/o and gate/up/down")
        if hasattr(att, "q_norm") or hasattr(att, "k_norm"):
            raise NotImplementedError("q/k norms (the kernel has none)")
    if getattr(model.lm_head, "bias", None) is not None:
        raise NotImplementedError("an lm_head bias")


@torch.no_grad()
def stack_weights(model: torch.nn.Module) -> DecodeWeights:
    """The model's weights stacked per kind (a copy) for the whole-step kernel."""
    _check_llama_style(model)
    inner, c = model.model, model.config
    att = [layer.self_attn for layer in inner.layers]
    mlp = [layer.mlp for layer in inner.layers]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    eps = getattr(c, "rms_norm_eps", None) or inner.norm.variance_epsilon
    return DecodeWeights(
        wq=torch.cat([torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) for a in att]),
        wo=torch.cat([a.o_proj.weight for a in att]),
        wg=torch.cat([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in mlp]),
        wd=torch.cat([m.down_proj.weight.t() for m in mlp]),  # transposed: the kernel's MLP is split-K
        # detached: a parameter that is already contiguous would come back as itself, needing grad (the
        # float32 oracle run on these weights would then keep every step's graph)
        wl=model.lm_head.weight.detach().contiguous(),
        n1=torch.stack([layer.input_layernorm.weight for layer in inner.layers]),
        n2=torch.stack([layer.post_attention_layernorm.weight for layer in inner.layers]),
        nf=inner.norm.weight.detach().contiguous(), embed=inner.embed_tokens.weight.detach().contiguous(),
        inv_freq=inner.rotary_emb.inv_freq.detach().float().contiguous(),
        rope_scale=float(getattr(inner.rotary_emb, "attention_scaling", 1.0)), eps=float(eps),
        num_q_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=head_dim)


def prepare_weights(model: torch.nn.Module, enabled: bool, block_size: int) -> DecodeWeights | None:
    """The stacked weights when the option is on and the model and card can run the kernel; else None
    (with a one-line warning saying why). Called before the KV cache takes the free memory."""
    if not enabled:
        return None
    param = next(model.parameters())
    reason = card_problem(param.device, param.dtype)  # before copying any weight
    if reason is None:
        try:
            weights = stack_weights(model)
            reason = problem(weights, block_size, weights.embed.device)
        except NotImplementedError as e:
            reason = str(e)
    if reason is not None:
        log.warning("xyserve: decode_megakernel off, batch-1 decode runs the compiled model: %s", reason)
        return None
    return weights


def rows_kernel(weights: DecodeWeights, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                block_size: int):
    """The multi-row kernel (ascend_kernels/decode_rows_wgmma.py) for `decode_megakernel_rows`, or None
    with a one-line warning saying why the model or card cannot run it (batch-1 steps keep their kernel)."""
    from ascend_kernels.decode_rows_wgmma import DecodeRowsWgmmaKernel, wgmma_rows_problem

    k, v = stacked(k_caches), stacked(v_caches)
    reason = wgmma_rows_problem(weights, block_size, weights.embed.device)
    if reason is None and (k is None or v is None):
        reason = "the KV caches are not one stacked tensor per K and V"
    if reason is not None:
        log.warning("xyserve: decode_megakernel_rows off, steps of several requests run the compiled model: %s",
                    reason)
        return None
    return DecodeRowsWgmmaKernel(weights, k, v, block_size)


def stacked(caches: list[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor whose consecutive slices the per-layer caches are, or None."""
    base = caches[0]._base
    if base is None or base.shape[0] != len(caches) or not base.is_contiguous():
        return None
    if any(c._base is not base or c.data_ptr() != base[i].data_ptr() for i, c in enumerate(caches)):
        return None
    return base


class DecodeKernelPath:
    """Runs decode steps on the whole-step kernel; counts its launches.

    Batch 1: the kernel runs as a decode loop. Each launch writes its greedy token over the step's input
    token, steps the position (both in the step's device buffers) and records the token at
    tokens_out[position], so a burst of launches decodes token after token with no host work between:

        input_ids[0], position_ids[0]:  t, p  ->  t1, p+1  ->  t2, p+2 ...     (launch by launch)
        tokens_out:                     [... | t1 @ p | t2 @ p+1 | ...]        (the host reads a slice)

    A burst runs on the grid the kernel timed fastest for its first position (`grid_for`: fewer programs
    for short contexts, more for long ones); each (bucket, burst size, grid) has its own CUDA graph.

    Several rows: a kernel with `max_rows` > 1 (and `launch_rows`) takes steps of up to that many
    requests, each decoding one token, in one launch: it reads the step's input ids, positions, block
    table and slot mapping (a negative slot marks a padding row of a CUDA-graph bucket), writes each
    row's greedy token into `row_tokens` and its logits into row r of its `rows_logits` [max_rows, V].
    The batch-1 kernel (DecodeStepKernel) has no such launch: its `max_rows` is 1. `decode_megakernel_rows`
    passes the swap-AB wgmma multi-row kernel (ascend_kernels/decode_rows_wgmma.py, `rows_kernel`): on an
    H100 the engine decoded 16 requests at 12,006 tok/s with it (bursts of rows included), 10,572 with the
    compiled path, in one run (benchmarks/RESULTS.md, twenty-first session). A kernel whose `rows_loop` is
    true also runs bursts of rows: launch s of a burst writes its rows' tokens at tokens_out[s * rows ...]
    and over their input ids, and steps their positions and slots (through the block table) for launch
    s + 1:

        tokens_out:  [ t(step 0, row 0) .. t(0, rows - 1) | t(1, 0) .. t(1, rows - 1) | ... ]
    """

    def __init__(self, weights: DecodeWeights, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 block_size: int, max_model_len: int, kernel=None):
        k, v = stacked(k_caches), stacked(v_caches)
        if k is None or v is None:
            raise ValueError("the KV caches are not one stacked tensor per K and V")
        self.kernel = kernel or DecodeStepKernel(weights, k, v, block_size)
        self.max_rows = getattr(self.kernel, "max_rows", 1)
        # rows a burst may have: several when the kernel's launch_rows takes loop=True (it then writes
        # each row's token over its input id and steps its position and slot, like the batch-1 loop)
        self.burst_rows = self.max_rows if getattr(self.kernel, "rows_loop", False) else 1
        self.num_steps = 0
        self.tokens_out = torch.zeros(max_model_len + 1, dtype=torch.int64, device=k.device)
        self.row_tokens = torch.zeros(self.max_rows, dtype=torch.int64, device=k.device)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # per (bucket buffer, burst size or 0, grid)
        self._rows = False  # the last step was a multi-row launch

    @staticmethod
    def takes(rows, max_rows: int = 1) -> bool:
        """1 to max_rows requests, each decoding one new token: sampled, no drafts."""
        return 1 <= len(rows) <= max_rows and all(
            len(r.token_ids) == 1 and r.sample and r.num_draft_tokens == 0 for r in rows)

    @property
    def logits(self) -> torch.Tensor:
        """[rows, V] fp32 logits of the last step (a buffer the next launch overwrites): the batch-1
        launch's one row, or a multi-row launch's `rows_logits` [max_rows, V]."""
        buf = self.kernel.rows_logits if self._rows else self.kernel.logits
        return buf.view(-1, buf.shape[-1])

    def _launch(self, inputs: dict, num_steps: int, grid: int | None, num_rows: int = 0) -> None:
        metadata = inputs[hf.METADATA_KWARG]
        if num_rows:  # launches over every row; a burst's launch s writes tokens_out[s * rows ...]
            for s in range(num_steps):
                out = self.row_tokens if num_steps == 1 else self.tokens_out[s * num_rows:]
                loop = {} if num_steps == 1 else {"loop": True}
                self.kernel.launch_rows(inputs["input_ids"][0], inputs["position_ids"][0], metadata.block_table,
                                        metadata.slot_mapping, out, **loop)
            return
        on_grid = {} if grid is None else {"grid": grid}  # kernels without grid_for take no grid
        for _ in range(num_steps):
            self.kernel.launch(inputs["input_ids"][0], inputs["position_ids"][0], metadata.block_table[0],
                               self.tokens_out, loop=True, **on_grid)

    def run(self, inputs: dict, static: bool, pos: int, num_steps: int = 1, num_rows: int = 1) -> torch.Tensor:
        """The greedy tokens (int64; a view of a buffer that later steps reuse) of the step packed in
        `inputs`: with one row, whose token sits at position `pos`, [num_steps] tokens decoded one
        after another; with num_rows > 1, [num_steps * num_rows], step by step, one per row a step (a
        burst of rows: each launch feeds its tokens, positions and slots to the next). With `static` inputs (a
        CUDA graph bucket's buffers) the launches are replayed from a graph captured after the first run
        of that bucket and burst size (a Gluon launch costs tens of microseconds of host time)."""
        if num_rows > self.burst_rows and num_steps != 1:
            raise ValueError(f"decode bursts of {num_rows} requests: this kernel's bursts take {self.burst_rows}")
        if num_rows * num_steps > self.tokens_out.numel():
            raise ValueError(f"a decode burst of {num_steps} steps x {num_rows} rows exceeds tokens_out")
        rows = num_rows if num_rows > 1 else 0  # 0: the batch-1 kernel
        self._rows = rows > 0
        self.num_steps += num_steps
        grid_for = getattr(self.kernel, "grid_for", None)  # the batch-1 kernel's grid depends on the position
        grid = grid_for(pos) if grid_for is not None and not rows else None
        key = (inputs["input_ids"].data_ptr(), num_steps, grid, rows)
        graph = self._graphs.get(key) if static else None
        if graph is not None:
            graph.replay()
        else:
            self._launch(inputs, num_steps, grid, rows)  # compiles on the first step
            if static:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # captured, not run: this step is already launched
                    self._launch(inputs, num_steps, grid, rows)
                self._graphs[key] = graph
        if not rows:
            return self.tokens_out[pos : pos + num_steps]
        return self.row_tokens[:num_rows] if num_steps == 1 else self.tokens_out[: num_steps * num_rows]
