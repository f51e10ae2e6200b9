"""Configuration dataclasses, checked once in __post_init__ and passed down."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMPLS = ("auto", "triton", "reference")


@dataclass(slots=True)
class CompileOptions:
    """Options of the `xyserve` torch.compile backend (`torch.compile(..., options={...})`).

    lower_attention: rewrite SDPA / HF eager attention into `xyserve::attention`. None ("auto"): yes,
                     except on a GPU when Inductor does not replay the graph in CUDA graphs (no
                     mode="reduce-overhead"): launched eagerly, a dense attention call costs ~170 us of
                     host time against ~26 for SDPA, for the same GPU time at decode (H100). The
                     engine's paged attention does not go through this pass.
    lower_gemm:      rewrite linear / addmm / Conv1D into `xyserve::gemm`. None ("auto"): as above:
                     launched eagerly, each lowered GEMM costs more host time than SmoothGEMM saves
                     on the GPU. The engine (own CUDA graphs) passes a bool.
    impl:            kernel choice baked into the lowered ops: "auto" (Triton on CUDA, the
                     pure-torch reference on CPU), "triton" or "reference". Under "auto" a GEMM
                     runs cuBLAS where the card's tuned SmoothGEMM table measured it faster, and
                     for shapes no table covers; "triton" keeps every GEMM on SmoothGEMM.
    inductor_config: Inductor config patches, passed to `compile_fx(config_patches=...)`.
    use_inductor:    False runs the lowered graph as is (handy for debugging the passes).
    fuse_sibling_linears: fuse linears that read one input and whose weights lie back to back in
                     one storage (q/k/v, gate/up after `pack_sibling_linears`) into one GEMM. Only
                     while those weights stay in place: the engine turns it on for the model it owns.
    share_tables:    compute a cos / sin table read by several layers (RoPE) once, instead of in
                     every consumer kernel (lowering/shared_tables.py); same values.
    fuse_norm_linear: residual add + RMSNorm + the one linear they feed (and SiLU x up after a
                     packed gate/up) become one `xyserve::norm_linear` (lowering/norm_linear.py);
                     16-bit results differ from eager in the last bits. Off by default, also in
                     the engine: on an H100 it is 2-3% slower end to end today (RESULTS.md).
    """

    lower_attention: bool | None = None
    lower_gemm: bool | None = None
    impl: str = "auto"
    inductor_config: dict[str, Any] = field(default_factory=dict)
    use_inductor: bool = True
    fuse_sibling_linears: bool = False
    share_tables: bool = True
    fuse_norm_linear: bool = False

    def __post_init__(self) -> None:
        for name in ("lower_attention", "lower_gemm"):
            if getattr(self, name) not in (None, True, False):
                raise TypeError(f"xyserve: {name} must be True, False or None (auto), got {getattr(self, name)!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"xyserve: impl must be one of {IMPLS}, got {self.impl!r}")
        if not isinstance(self.inductor_config, dict):
            raise TypeError("xyserve: inductor_config must be a dict of Inductor config patches")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "CompileOptions":
        options = dict(options or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"xyserve: unknown backend option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"xyserve: {name} must be a positive int, got {value!r}")


SPEC_METHODS = ("ngram", "draft_model")


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding: a drafter proposes up to k tokens per decoding request; the target
    verifies them in the same forward pass as the other requests' prefill chunks and decodes.

    method:                 "ngram" (prompt lookup, no extra model) or "draft_model".
    num_speculative_tokens: k, the most tokens drafted per request and step.
    draft_model:            an HF causal LM object or a local checkpoint folder (draft_model only);
                            it must share the target's tokenizer / vocabulary.
    ngram_min, ngram_max:   n-gram sizes tried, longest first (ngram only).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    draft_model: Any = None
    ngram_min: int = 1
    ngram_max: int = 3

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"xyserve: speculative method must be one of {SPEC_METHODS}, got {self.method!r}")
        _positive_int("num_speculative_tokens", self.num_speculative_tokens)
        if (self.method == "draft_model") != (self.draft_model is not None):
            raise ValueError("xyserve: draft_model is required by (and only by) method='draft_model'")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"xyserve: need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")


@dataclass(slots=True)
class EngineConfig:
    """Options of the generation engine (`LLM(model, **engine_config)`).

    block_size:             tokens per paged KV block.
    num_kv_blocks:          KV blocks per layer; None sizes the pool from `kv_cache_memory_fraction`
                            of free GPU memory (CUDA) or room for `max_num_seqs` full sequences (CPU).
    kv_cache_memory_fraction: share of free device memory given to the KV cache when sizing it.
    max_num_batched_tokens: the token budget of one step; None: 8192 on CUDA, 512 elsewhere.
    max_num_seqs:           most requests running at once (each decode needs one budget token);
                            None: min(256, the token budget).
    max_model_len:          longest prompt + generation; None reads the model's position limit.
    enable_prefix_caching:  share full KV blocks between requests with equal prefixes.
    compile:                run the model under `torch.compile(backend=compile_backend)`;
                            None means True on CUDA, False elsewhere.
    compile_backend:        the torch.compile backend name ("xyserve", "inductor", "eager", ...).
    compile_options:        `options` for the backend (for "xyserve": CompileOptions fields); None
                            means {"lower_gemm": False} for "xyserve" (attention lowered, linears
                            on cuBLAS: faster end to end today), {} lowers linears to SmoothGEMM too.
                            On CUDA the engine adds Inductor's combo kernels (one launch for the
                            q and k RoPE kernels) unless inductor_config sets combo_kernels.
    impl:                   kernel choice for the paged attention / KV store ops.
    device, dtype:          where and in which dtype to load a checkpoint given by path.
    seed:                   seeds the shared generator of requests sampled without their own seed.
    speculative:            speculative decoding (SpeculativeConfig or a dict of its fields), or None.
    cuda_graphs:            pad each step to a token bucket and replay the bucket's CUDA graph (captured
                            at start-up); None means on for CUDA, off elsewhere. True on CPU pads the
                            steps to the buckets without graphs (tests the padding).
    cuda_graph_sizes:       the token buckets; None: 2, 4, 8, ... up to min(token budget, 2048). Steps
                            bigger than the largest bucket run eagerly.
    async_scheduling:       schedule and launch each step while the device still runs the previous one
                            (engine/overlap.py); the host reads sampled tokens one step late. Steps run
                            in order while speculative decoding or a repetition penalty needs the
                            tokens on the host. None means on for CUDA, off elsewhere.
    decode_megakernel:      run steps that decode one token of one request (batch 1, no drafts) as one
                            persistent launch of the whole model (engine/decode_kernel.py): Llama-style
                            bf16 models on a Hopper GPU; copies the weights once more. Elsewhere it logs
                            why and the compiled model runs those steps.
    decode_megakernel_rows: with decode_megakernel, steps of up to 16 requests that each decode one token
                            also run as one persistent launch (ascend_kernels/decode_rows_wgmma.py;
                            Llama-3.2-1B-like shapes on a Hopper GPU). On an H100 the engine decoded 16
                            requests at 12,006 tok/s with it (and bursts of rows) against 10,572 without
                            (one run; benchmarks/RESULTS.md). It holds its own copies of the q/k/v and gate/up
                            weights (the norm weights folded in: 1.3 GB for Llama-3.2-1B).
    decode_burst:           with decode_megakernel, a lone greedy request (nothing waiting) decodes up to
                            this many tokens per engine step: the kernel feeds each token to its next
                            launch on the device and the host reads them together (vLLM's multi-step
                            decoding). Outputs then stream in groups; tokens past a stop are dropped.
                            Several greedy requests (all running, nothing waiting) burst together on a
                            multi-row kernel whose launches loop (decode_megakernel_rows), for as many
                            steps as the one with the least room left allows. 1 turns it off.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    compile: bool | None = None
    compile_backend: str = "xyserve"
    compile_options: dict[str, Any] | None = None
    impl: str = "auto"
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    speculative: SpeculativeConfig | dict | None = None
    cuda_graphs: bool | None = None
    cuda_graph_sizes: list[int] | None = None
    async_scheduling: bool | None = None
    decode_megakernel: bool = False
    decode_megakernel_rows: bool = False
    decode_burst: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.speculative, dict):
            self.speculative = SpeculativeConfig(**self.speculative)
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ValueError(f"xyserve: speculative must be a SpeculativeConfig or a dict, got {self.speculative!r}")
        _positive_int("block_size", self.block_size)
        _positive_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        _positive_int("max_num_seqs", self.max_num_seqs, allow_none=True)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        if not 0.0 < float(self.kv_cache_memory_fraction) <= 1.0:
            raise ValueError(
                f"xyserve: kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}"
            )
        budget, seqs = self.max_num_batched_tokens, self.max_num_seqs
        if budget is not None and seqs is not None and budget < seqs:
            # Every running request must be able to decode in the same step.
            raise ValueError(
                f"xyserve: max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running request can decode each step"
            )
        if self.impl not in IMPLS:
            raise ValueError(f"xyserve: impl must be one of {IMPLS}, got {self.impl!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"xyserve: compile must be True, False or None, got {self.compile!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f"xyserve: compile_backend must be a backend name, got {self.compile_backend!r}")
        if self.compile_options is not None and not isinstance(self.compile_options, dict):
            raise ValueError(f"xyserve: compile_options must be a dict, got {self.compile_options!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"xyserve: cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")
        if not isinstance(self.decode_megakernel, bool):
            raise ValueError(f"xyserve: decode_megakernel must be a bool, got {self.decode_megakernel!r}")
        if not isinstance(self.decode_megakernel_rows, bool):
            raise ValueError(f"xyserve: decode_megakernel_rows must be a bool, got {self.decode_megakernel_rows!r}")
        if self.decode_megakernel_rows and not self.decode_megakernel:
            raise ValueError("xyserve: decode_megakernel_rows needs decode_megakernel=True (the same weights and path)")
        _positive_int("decode_burst", self.decode_burst)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"xyserve: async_scheduling must be True, False or None, got {self.async_scheduling!r}")
        if self.cuda_graph_sizes is not None:
            sizes = list(self.cuda_graph_sizes)
            if not sizes:
                raise ValueError("xyserve: cuda_graph_sizes must list at least one token count")
            for n in sizes:
                _positive_int("cuda_graph_sizes entry", n)
            self.cuda_graph_sizes = sizes
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"xyserve: seed must be an int, got {self.seed!r}")


@dataclass(slots=True)
class SamplingParams:
    """How to pick each new token of one request and when to stop.

    temperature 0 is greedy. top_k <= 0 and top_p == 1 disable those filters. repetition_penalty
    follows HF (divide positive logits of seen tokens, multiply negative ones). seed gives the
    request its own generator, so its tokens do not depend on the rest of the batch.
    Stops: max_tokens new tokens, the model's EOS (unless ignore_eos), any of stop_token_ids, or
    any of the `stop` strings (needs a tokenizer; the stop string is cut from the text).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _positive_int("max_tokens", self.max_tokens)
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"xyserve: {name} must be a number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"xyserve: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"xyserve: top_k must be an int (<= 0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"xyserve: top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"xyserve: repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"xyserve: seed must be an int or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"xyserve: stop must be non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"xyserve: stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def argmax_only(self) -> bool:
        """The token is the plain argmax of the logits (greedy, no penalty reshaping them)."""
        return self.greedy and self.repetition_penalty == 1.0
