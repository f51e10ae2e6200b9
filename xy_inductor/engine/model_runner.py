"""ModelRunner: pack one scheduled step into flat tensors and run the HF model once for all of it.

The whole mixed step is one sequence of batch 1: input_ids / position_ids [1, T]. Request
boundaries live only in the attention metadata (cu_seqlens_q, seq_lens, block_table,
slot_mapping), so prefill chunks and decodes share every GEMM. No HF cache is used (the paged KV
caches live here), and logits are computed only at the rows that sample (`logits_to_keep`).
"""
from __future__ import annotations

import inspect

import torch

from ascend_kernels import tiling
from lowering.ops import use_triton
from xy_inductor import hf
from xy_inductor.config import EngineConfig
from xy_inductor.engine.attention_metadata import PagedAttentionMetadata
from xy_inductor.engine.model_check import LayerSpec, check_model
from xy_inductor.engine.outputs import SchedulerOutput

TOKEN_PAD = 8  # the packed token count is padded to a multiple of this
_CPU_KV_BYTES = 2 << 30  # default KV pool cap on CPU, where memory is shared with everything else


def model_max_len(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _task_table(rows, spec: LayerSpec | None, device: torch.device) -> torch.Tensor | None:
    """The planner's Task-Table for the step, shared by all layers (None: the kernel plans itself)."""
    if spec is None:
        return None
    table = tiling.build_task_table(
        [r.num_new_tokens for r in rows],
        [r.seq_len for r in rows],
        [r.stage.value for r in rows],
        num_q_heads=spec.num_q_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        device=device,
    )
    return table.to(device, non_blocking=True)


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
        self.num_blocks = self._num_blocks()
        self.k_caches, self.v_caches = self._allocate_caches()
        # One Task-Table serves every layer when they share a head layout and Triton runs them.
        uniform = all(s == self.layers[0] for s in self.layers)
        triton = use_triton(config.impl, self.k_caches[0])
        self._plan_spec = self.layers[0] if uniform and triton else None
        self.forward = self._maybe_compile(model)

    # ------------------------------------------------------------ set-up
    def _bytes_per_block(self) -> int:
        return sum(
            self.block_size * s.num_kv_heads * (s.head_dim + s.value_dim) * s.dtype.itemsize for s in self.layers
        )

    def _num_blocks(self) -> int:
        per_seq = -(-self.max_model_len // self.block_size)
        num = self.config.num_kv_blocks
        if num is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                num = int(free * self.config.kv_cache_memory_fraction) // self._bytes_per_block()
            else:
                num = min(per_seq * (self.config.max_num_seqs or 64), _CPU_KV_BYTES // self._bytes_per_block())
                num = max(num, per_seq)
        if num < per_seq:
            raise ValueError(
                f"xyserve: {num} KV blocks of {self.block_size} tokens cannot hold one request of max_model_len "
                f"{self.max_model_len} ({per_seq} blocks); give more blocks or lower max_model_len"
            )
        return num

    def _allocate_caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        k, v = [], []
        for s in self.layers:
            shape = (self.num_blocks, self.block_size, s.num_kv_heads)
            k.append(torch.zeros(*shape, s.head_dim, dtype=s.dtype, device=self.device))
            v.append(torch.zeros(*shape, s.value_dim, dtype=s.dtype, device=self.device))
        return k, v

    def _maybe_compile(self, model):
        use = self.config.compile if self.config.compile is not None else self.device.type == "cuda"
        if not use:
            return model
        from torch._dynamo.backends.registry import lookup_backend

        backend = self.config.compile_backend
        try:
            lookup_backend(backend)  # fail now, not at the first step
        except Exception:
            if backend != "xyserve":
                raise
            # Not pip-installed (no entry point): the backend function itself works as well.
            from xy_inductor.backend import xyserve as backend
        options = self.config.compile_options
        return torch.compile(model, backend=backend, dynamic=True, options=options)

    # ------------------------------------------------------------ one step
    def _tensor(self, values, dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def prepare(self, out: SchedulerOutput) -> tuple[dict, list[str]]:
        """Flat model inputs and attention metadata for the step; the ids of the rows that sample
        (each brings num_draft_tokens + 1 logits rows, in order).

        Every dynamic size is padded to at least 2 (Dynamo specialises sizes 0 and 1, which would
        compile the model up to four times), and the token count to a multiple of TOKEN_PAD.
        Padding rows belong to no request: slot -1 (not stored), outside cu_seqlens_q (not attended).
        """
        ids, positions, slots, cu, seq_lens, keep, sample_ids = [], [], [], [0], [], [], []
        for row in out.rows:
            ids += row.token_ids
            positions.extend(row.positions)
            slots += row.slot_mapping
            cu.append(cu[-1] + row.num_new_tokens)
            seq_lens.append(row.seq_len)
            if row.sample:  # a verify row wants every drafted position and the one after
                keep.extend(range(cu[-1] - row.num_draft_tokens - 1, cu[-1]))
                sample_ids.append(row.request_id)
        pad = -len(ids) % TOKEN_PAD + (TOKEN_PAD if len(ids) < 2 else 0)
        ids += [0] * pad
        positions += [0] * pad
        slots += [-1] * pad
        for _ in range(2 - len(seq_lens)):  # empty requests: no query rows, no KV
            cu.append(cu[-1])
            seq_lens.append(0)
        keep += [0] * (2 - len(keep))  # extra logits rows, dropped after the forward
        width = max(2, max(len(r.block_table) for r in out.rows))
        table = [r.block_table + [0] * (width - len(r.block_table)) for r in out.rows]
        table += [[0] * width] * (len(seq_lens) - len(table))
        metadata = PagedAttentionMetadata(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=self._tensor(slots, torch.int64),
            cu_seqlens_q=self._tensor(cu, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_table=self._tensor(table, torch.int32),
            task_table=_task_table(out.rows, self._plan_spec, self.device),
            max_model_len=self.max_model_len,
            impl=self.config.impl,
        )
        inputs = {
            "input_ids": self._tensor(ids, torch.int64)[None],
            "position_ids": self._tensor(positions, torch.int64)[None],
            "logits_to_keep": self._tensor(keep, torch.int64),
            "use_cache": False,
            hf.METADATA_KWARG: metadata,
        }
        return inputs, sample_ids

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[str]]:
        """Run the step; logits [N, V] at the N sampling positions, with the sampling requests' ids
        (a request with d drafted tokens owns d + 1 consecutive rows)."""
        inputs, sample_ids = self.prepare(out)
        logits = self.forward(**inputs).logits
        num_rows = sum(r.num_draft_tokens + 1 for r in out.rows if r.sample)
        return logits[0, :num_rows], sample_ids
