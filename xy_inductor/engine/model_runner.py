"""ModelRunner: pack one scheduled step into flat tensors and run the HF model once for all of it.

The whole mixed step is one sequence of batch 1: input_ids / position_ids [1, T]. Request
boundaries live only in the attention metadata (cu_seqlens_q, seq_lens, block_table,
slot_mapping), so prefill chunks and decodes share every GEMM. No HF cache is used (the paged KV
caches live here), and logits are computed only at the rows that sample (`logits_to_keep`).

Host cost per step: the step is packed with numpy into one pinned buffer (step_buffer.py) and
reaches the device in two copies; the Task-Table is re-planned only when the batch's shape
changes (task_tables.py). On CUDA the step is then padded virtually to a token bucket and the
bucket's captured CUDA graph is replayed (cuda_graphs.py); steps bigger than every bucket run
the model eagerly.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ascend_kernels.profiles import TargetProfile, profile_for
from ascend_kernels.row_argmax import RowArgmax
from lowering.ops import use_triton
from xy_inductor import hf
from xy_inductor.config import EngineConfig
from xy_inductor.engine.attention_metadata import PagedAttentionMetadata
from xy_inductor.engine.compiled_model import compile_model
from xy_inductor.engine.cuda_graphs import CudaGraphs, bucket_sizes
from xy_inductor.engine.decode_kernel import DecodeKernelPath, prepare_weights, rows_kernel
from xy_inductor.engine.kv_tensors import allocate_kv_caches, num_kv_blocks
from xy_inductor.engine.model_check import LayerSpec, check_model
from xy_inductor.engine.outputs import SchedulerOutput
from xy_inductor.engine.step_buffer import (
    StepBuffer,
    StepLayout,
    StepShape,
    StepViews,
    step_shape,
    views,
)
from xy_inductor.engine.task_tables import TaskTables, table_capacity

log = logging.getLogger("xyserve")

TOKEN_PAD = 8  # an eager step's token count is padded to a multiple of this


def model_max_len(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@dataclass(slots=True)
class PreparedStep:
    """One packed step: the forward's kwargs, the bucket whose graph runs it (None: eager), the
    number of logits rows wanted and the ids of the sampling requests."""

    inputs: dict
    layout: StepLayout
    graph: bool
    num_rows: int
    sample_ids: list[str]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig) -> None:
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise NotImplementedError(
                f"xyserve: {type(model).__name__}.forward has no logits_to_keep argument; the engine needs it "
                "to compute logits only at sampling positions"
            )
        self.model = model.eval()
        self.device = next(model.parameters()).device
        limit = model_max_len(model.config)
        if config.max_model_len is not None and limit is not None and config.max_model_len > limit:
            raise ValueError(f"xyserve: max_model_len {config.max_model_len} exceeds the model's limit {limit}")
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len is None:
            raise ValueError("xyserve: the model config has no position limit; pass max_model_len")
        self.config = config
        self.block_size = config.block_size
        self.layers: list[LayerSpec] = check_model(model, self.max_model_len)
        # the whole-step kernel's stacked weights go first: the KV pool is sized from the memory left
        decode_weights = prepare_weights(model, config.decode_megakernel, self.block_size)
        self.num_blocks = num_kv_blocks(self.layers, config, self.max_model_len, self.device)
        self.k_caches, self.v_caches = allocate_kv_caches(self.layers, self.num_blocks, self.block_size, self.device)
        self.decode_path = None
        self.last_argmax: torch.Tensor | None = None  # the last step's logits' argmax [N], when known
        self.picked_tokens: torch.Tensor | None = None  # a decode burst's tokens, picked on the device
        if decode_weights is not None:
            rows = (rows_kernel(decode_weights, self.k_caches, self.v_caches, self.block_size)
                    if config.decode_megakernel_rows else None)
            self.decode_path = DecodeKernelPath(decode_weights, self.k_caches, self.v_caches, self.block_size,
                                                self.max_model_len, kernel=rows)
        # One Task-Table serves every layer when they share a head layout and Triton runs them.
        uniform = all(s == self.layers[0] for s in self.layers)
        triton = use_triton(config.impl, self.k_caches[0])
        self._plan_spec = self.layers[0] if uniform and triton else None
        # greedy tokens inside the step (and its CUDA graph): one launch instead of the sampler's
        # torch reductions after it (ascend_kernels/row_argmax.py)
        self._device_argmax = triton and self.device.type == "cuda"
        self._argmax: RowArgmax | None = None
        self.forward, self.packed = compile_model(model, config, self.device)
        self._setup_steps()

    # ------------------------------------------------------------ set-up
    def _setup_steps(self) -> None:
        """Step buffers, the Task-Table planner, the token buckets and (CUDA) their graphs."""
        # a module-level import would be circular (the engine imports this module)
        from xy_inductor.engine.engine import default_budget

        cfg, cuda = self.config, self.device.type == "cuda"
        budget = cfg.max_num_batched_tokens or max(default_budget(self.device), cfg.max_num_seqs or 0)
        self.max_num_seqs = cfg.max_num_seqs or min(256, budget)
        spec = getattr(cfg, "speculative", None)
        self.max_keep = self.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
        self.max_blocks = max(2, -(-self.max_model_len // self.block_size))
        layer = self._plan_spec
        self.tables = TaskTables(layer.num_q_heads, layer.num_kv_heads, layer.head_dim) if layer else None
        self._profile = profile_for(self.device) if layer else None
        self._variants: dict[tuple[int, int], TargetProfile] = {}
        use = cfg.cuda_graphs if cfg.cuda_graphs is not None else cuda
        if use and cuda and layer is None:
            log.warning("xyserve: CUDA graphs need the Triton paged-attention kernels (impl 'auto' or 'triton') "
                        "and one head layout in every layer; running every step eagerly")
            use = False
        self.buckets = [self._bucket_layout(n) for n in bucket_sizes(cfg.cuda_graph_sizes, budget)] if use else []
        self.buffer = StepBuffer(max([lay.size for lay in self.buckets] + [1 << 16]), pin=cuda)
        self._copied = torch.cuda.Event() if cuda else None
        self._device_flat: torch.Tensor | None = None  # eager steps' device buffer (grows)
        self.graphs: CudaGraphs | None = None
        self.graph_error: str | None = None
        self.num_eager_steps = 0
        if use and cuda:
            self._capture()

    def _variant(self, num_tokens: int, num_seqs: int) -> TargetProfile:
        """The attention variant the launcher picks for these (padded) sizes, frozen so the planner
        cuts tiles for exactly the kernel that runs them."""
        key = (num_tokens, num_seqs)
        if key not in self._variants:
            variant = self._profile.for_batch(num_tokens, num_seqs)
            if variant.memory_overrides:
                variant = dataclasses.replace(variant, memory_overrides=())
            self._variants[key] = variant
        return self._variants[key]

    def _bucket_layout(self, num_tokens: int) -> StepLayout:
        seqs = max(2, min(num_tokens, self.max_num_seqs))
        keep = max(2, min(num_tokens, self.max_keep))
        table = table_capacity(self._variant(num_tokens, seqs), self._plan_spec, num_tokens, seqs) if self.tables else 0
        return StepLayout(num_tokens, seqs, keep, self.max_blocks, table)

    def _capture(self) -> None:
        static = torch.zeros(self.buckets[-1].size, dtype=torch.int32, device=self.device)
        self._static_flat = static
        self._static = {lay.num_tokens: self._inputs(views(static, lay)) for lay in self.buckets}

        def reset(layout: StepLayout) -> None:
            self.buffer.pack_empty(layout)
            static[: layout.size].copy_(self.buffer.host[: layout.size])

        def run(layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
            logits = self.forward(**self._static[layout.num_tokens]).logits[0]
            return logits, self._argmax_of(logits)

        graphs = CudaGraphs(self.buckets, self.device)
        compiled_before = _graphs_compiled()
        try:
            with torch.inference_mode():
                graphs.capture(run, reset)
        except Exception as e:  # never wrong tokens: the steps run eagerly instead
            self.graph_error = f"{type(e).__name__}: {e}"[:300]
            log.warning("xyserve: CUDA graph capture failed (%s); running every step eagerly", self.graph_error)
            self.buckets = []
            return
        self.graphs = graphs
        # every step size is symbolic in one compiled graph; more graphs mean something
        # specialised a size (each costs a full compile and start-up time)
        self.graphs_compiled_at_capture = _graphs_compiled() - compiled_before
        if self.forward is not self.model and self.graphs_compiled_at_capture > 1:
            log.warning("xyserve: %d graphs compiled while capturing %d buckets (expected 1): a step size was "
                        "specialised; run with TORCH_LOGS=recompiles to see which", self.graphs_compiled_at_capture,
                        len(self.buckets))

    # ------------------------------------------------------------ one step
    def _argmax_of(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The argmax of every logits row, on the device (None where the sampler computes it). The
        workspace is made at the first call: a graph capture is always preceded by warm-up runs."""
        if not self._device_argmax or logits.dim() != 2 or logits.stride(-1) != 1:
            return None  # the sampler's torch argmax takes any layout
        if self._argmax is None:
            self._argmax = RowArgmax(max(2, self.max_keep), logits.shape[-1], self.device)
        if logits.shape[0] > self._argmax.max_rows or logits.shape[1] != self._argmax.vocab:
            return None  # never expected (steps keep at most max_keep rows); the sampler copes
        return self._argmax(logits)

    def _inputs(self, v: StepViews) -> dict:
        metadata = PagedAttentionMetadata(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=v.slot_mapping,
            cu_seqlens_q=v.cu_seqlens_q,
            seq_lens=v.seq_lens,
            block_table=v.block_table,
            task_table=v.task_table,
            max_model_len=self.max_model_len,
            impl=self.config.impl,
        )
        return {
            "input_ids": v.input_ids[None],
            "position_ids": v.position_ids[None],
            "logits_to_keep": v.logits_to_keep,
            "use_cache": False,
            hf.METADATA_KWARG: metadata,
        }

    def _table(self, shape: StepShape, num_tokens: int, num_seqs: int):
        if self.tables is None:
            return None
        return self.tables.table(shape.q_lens, shape.kv_lens, shape.stages, self._variant(num_tokens, num_seqs))

    def _layout(self, shape: StepShape):
        """The step's layout (the smallest bucket it fits, else one of its own) and Task-Table."""
        for layout in self.buckets:
            if layout.fits(shape.num_tokens, shape.num_seqs, shape.num_keep, shape.width, 0):
                table = self._table(shape, layout.num_tokens, layout.num_seqs)
                if table is None or len(table) <= layout.table_len:
                    return layout, table
                break
        # Eager: every size padded to >= 2 (Dynamo specialises 0 and 1: more compiles), tokens
        # to a multiple of TOKEN_PAD.
        tokens, seqs = -(-shape.num_tokens // TOKEN_PAD) * TOKEN_PAD, max(2, shape.num_seqs)
        table = self._table(shape, tokens, seqs)
        width = max(2, shape.width)
        return StepLayout(tokens, seqs, max(2, shape.num_keep), width, len(table) if table is not None else 0), table

    def _upload(self, layout: StepLayout, shape: StepShape, table_len: int, graph: bool) -> torch.Tensor:
        """The flat buffer the step's views read: the host one on CPU, else a device copy of it."""
        if self.device.type == "cpu":
            return self.buffer.host
        if graph:
            flat = self._static_flat
        else:
            if self._device_flat is None or self._device_flat.numel() < layout.size:
                with torch.inference_mode(False):  # a normal tensor, see prepare()
                    self._device_flat = torch.empty(2 * layout.size, dtype=torch.int32, device=self.device)
            flat = self._device_flat
        self.buffer.upload(flat, layout, shape, table_len)
        if self._copied is not None:
            self._copied.record()
        return flat

    def prepare(self, out: SchedulerOutput, feed: Callable[[torch.Tensor], None] | None = None) -> PreparedStep:
        """Pack the step (inputs and attention metadata) for the device; see PreparedStep. `feed`
        then writes the input ids the host does not know yet (overlap.py) into the device's
        [T] input_ids."""
        shape = step_shape(out.rows)
        layout, table = self._layout(shape)
        if self._copied is not None:
            self._copied.synchronize()  # the host buffer is free once the last step's copy is done
        self.buffer.ensure(layout.size)
        self.buffer.pack(out.rows, shape, layout, table)
        graph = self.graphs is not None and self.graphs.captured(layout)
        flat = self._upload(layout, shape, len(table) if table is not None else 0, graph)
        if graph:
            inputs = self._static[layout.num_tokens]
        else:
            # built outside inference mode like the captured graphs' inputs: views taken in
            # inference mode lack a dispatch key, and Dynamo would compile a second graph for them
            with torch.inference_mode(False):
                inputs = self._inputs(views(flat, layout))
        if feed is not None:
            feed(inputs["input_ids"][0])
        sample_ids = [r.request_id for r in out.rows if r.sample]
        return PreparedStep(inputs, layout, graph, shape.num_keep, sample_ids)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                feed: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, list[str]]:
        """Run the step; logits [N, V] at the N sampling positions, with the sampling requests' ids
        (a request with d drafted tokens owns d + 1 consecutive rows). Under CUDA graphs the
        logits are a static buffer: valid until the next step. After a decode burst (a row with
        num_steps > 1) `picked_tokens` holds its tokens and the logits are the last step's."""
        step = self.prepare(out, feed)
        self.last_argmax = self.picked_tokens = None
        logits = self._decode_kernel_step(out, step)
        if logits is None:
            if step.graph:
                logits, argmax = self.graphs.replay(step.layout)
            else:
                self._own_attention()
                logits = self.forward(**step.inputs).logits[0]
                argmax = self._argmax_of(logits)
                self.num_eager_steps += 1
            self.last_argmax = argmax[: step.num_rows] if argmax is not None else None
        return logits[: step.num_rows], step.sample_ids

    def _decode_kernel_step(self, out: SchedulerOutput, step: PreparedStep) -> torch.Tensor | None:
        """The step's logits from the whole-step decode kernel when it takes the step, else None. A
        failure before the kernel ever ran (its compile) turns the path off with a warning and the
        compiled model runs the step; once the kernel has run, a failure is raised."""
        path = self.decode_path
        if path is None or not path.takes(out.rows, path.max_rows):
            if any(r.num_steps > 1 for r in out.rows):
                raise RuntimeError("xyserve: a decode burst was scheduled without the decode kernel path")
            return None
        row = out.rows[0]
        try:
            tokens = path.run(step.inputs, step.graph, row.num_computed_tokens, row.num_steps, len(out.rows))
        except Exception as e:
            if self.decode_path.num_steps > row.num_steps:  # bursts come only after a step that ran
                raise
            log.warning("xyserve: decode_megakernel off, its first launch failed (%s: %s)", type(e).__name__,
                        str(e)[:200])
            self.decode_path = None
            return None
        if row.num_steps > 1:
            self.picked_tokens = tokens
        else:
            self.last_argmax = tokens
        return self.decode_path.logits

    def _own_attention(self) -> None:
        """The model's attention must be the paged one: a model switched back to "sdpa" (to run HF
        generate between engine calls) would ignore the paged KV cache and give wrong tokens."""
        if self.model.config._attn_implementation != hf.ATTN_IMPLEMENTATION:
            log.warning("xyserve: the model's attention was switched to %r; switching it back to %r for the engine",
                        self.model.config._attn_implementation, hf.ATTN_IMPLEMENTATION)
            self.model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)

    @property
    def stats(self) -> dict:
        stats = {"cuda_graphs": self.graphs is not None, "eager_steps": self.num_eager_steps}
        if self.graphs is not None:
            stats.update(self.graphs.stats)
        if self.graph_error:
            stats["cuda_graph_error"] = self.graph_error
        if self.graphs is not None:
            stats["graphs_compiled_at_capture"] = self.graphs_compiled_at_capture
        if self.tables is not None:
            stats.update(task_tables_planned=self.tables.num_planned, task_tables_reused=self.tables.num_reused)
        if self.decode_path is not None:
            stats["decode_megakernel_steps"] = self.decode_path.num_steps
        return stats
