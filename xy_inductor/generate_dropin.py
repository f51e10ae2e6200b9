"""`xy_inductor.accelerate(model)`: HF `model.generate(...)` served by the xyserve engine.

    xy_inductor.accelerate(model)                    # from now on
    with xy_inductor.accelerate(model): ...          # only inside the block

Supported arguments run through the engine (paged KV, mixed batches, speculative decoding) and
return what HF returns: the input ids followed by the new tokens, finished rows padded with
pad_token_id. Anything else (beam search, logits processors, output dicts, ...) falls back to HF's
own generate with a one-line warning naming what was not supported: never silently different.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from xy_inductor.config import SamplingParams

# GenerationConfig fields the engine maps (the rest must keep their defaults).
_SUPPORTED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
              "eos_token_id", "prompt_lookup_num_tokens", "num_assistant_tokens"}
# Fields that do not change the tokens (or only name special ids).
_HARMLESS = {"bos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
             "use_cache", "cache_implementation", "compile_config", "disable_compile", "cache_config",
             "num_assistant_tokens_schedule", "assistant_confidence_threshold", "max_matching_ngram_size"}


def _generation_config(model, generation_config, kwargs: dict) -> tuple[Any, list[str]]:
    """The call's effective GenerationConfig and the kwargs it does not know (model inputs)."""
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = gc.update(**{k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")})
    return gc, list(unused)


def unsupported(gc, unused: list[str]) -> list[str]:
    """Names of the generate arguments the engine does not serve (empty: it serves the call)."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    names = list(unused)
    for key, value in gc.to_dict().items():
        if key in _SUPPORTED or key in _HARMLESS:
            continue
        base = getattr(default, key, None)
        if value != base and (value or base):  # None, False and 0 all mean "off"
            names.append(key)
    if gc.min_new_tokens and gc.min_new_tokens != gc.max_new_tokens:
        names.append("min_new_tokens")
    return names


def sampling_params(gc, prompt_len: int) -> SamplingParams:
    new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - prompt_len
    if new <= 0:
        raise ValueError(f"xyserve: nothing to generate (max_length {gc.max_length} <= prompt length {prompt_len})")
    eos = gc.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    sampled = bool(gc.do_sample)
    return SamplingParams(
        max_tokens=new,
        temperature=float(gc.temperature or 1.0) if sampled else 0.0,
        top_k=int(gc.top_k or 0) if sampled else 0,
        top_p=float(gc.top_p or 1.0) if sampled else 1.0,
        repetition_penalty=float(gc.repetition_penalty or 1.0),
        stop_token_ids=[] if gc.min_new_tokens else eos,
        ignore_eos=True,  # the call's own eos_token_id decides (via stop_token_ids), not the model's
    )


class Accelerated:
    """Patches `model.generate`; also a context manager that restores HF's generate on exit."""

    def __init__(self, model: torch.nn.Module, **engine_config) -> None:
        self.model = model
        self.engine_config = engine_config
        self.attn_implementation = model.config._attn_implementation
        self._hf_generate = model.generate
        self._engines: dict[tuple, Any] = {}
        model.generate = self.generate

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        if vars(self.model).get("generate") == self.generate:
            del self.model.generate

    def _llm(self, spec: dict | None):
        from xy_inductor.engine.llm import LLM

        key = tuple(sorted((k, id(v)) for k, v in (spec or {}).items()))
        if key not in self._engines:
            self._engines[key] = LLM(self.model, speculative=spec, **self.engine_config)
        return self._engines[key]

    def generate(self, inputs=None, generation_config=None, streamer=None, assistant_model=None, **kwargs):
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        gc, unused = _generation_config(self.model, generation_config, kwargs)
        names = unsupported(gc, unused)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            names.append("inputs other than input_ids [batch, length]")
        elif streamer is not None and input_ids.shape[0] != 1:
            names.append("streamer with batch > 1")
        if names:
            warnings.warn(f"xyserve: generate falls back to Hugging Face's own for {sorted(set(names))}", stacklevel=2)
            return self._hf_generate(inputs, generation_config=generation_config, streamer=streamer,
                                     assistant_model=assistant_model, **kwargs)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        params = sampling_params(gc, input_ids.shape[1])
        spec = None
        if assistant_model is not None:
            spec = {"method": "draft_model", "draft_model": assistant_model,
                    "num_speculative_tokens": int(gc.num_assistant_tokens or 4)}
        elif gc.prompt_lookup_num_tokens:
            spec = {"method": "ngram", "num_speculative_tokens": int(gc.prompt_lookup_num_tokens)}
        llm = self._llm(spec)
        try:
            self.model.set_attn_implementation("xyserve")
            tokens = self._run(llm, prompts, params, streamer, input_ids)
        finally:
            self.model.set_attn_implementation(self.attn_implementation)
        return self._hf_output(input_ids, tokens, gc, params)

    @staticmethod
    def _run(llm, prompts, params, streamer, input_ids) -> list[list[int]]:
        if streamer is None:
            return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        streamer.put(input_ids.cpu())
        tokens: list[int] = []
        for out in llm.stream(prompts, params):
            for t in out.new_token_ids:
                streamer.put(torch.tensor([t]))
            tokens = out.token_ids
        streamer.end()
        return [tokens]

    @staticmethod
    def _hf_output(input_ids: torch.Tensor, tokens: list[list[int]], gc, params: SamplingParams) -> torch.Tensor:
        pad = gc.pad_token_id
        if pad is None:
            pad = params.stop_token_ids[0] if params.stop_token_ids else 0
        width = max(len(t) for t in tokens)
        new = torch.full((len(tokens), width), int(pad), dtype=input_ids.dtype)
        for i, t in enumerate(tokens):
            new[i, : len(t)] = torch.tensor(t, dtype=input_ids.dtype)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def accelerate(model: torch.nn.Module, **engine_config) -> Accelerated:
    """Serve `model.generate` with the xyserve engine (engine_config: EngineConfig fields)."""
    return Accelerated(model, **engine_config)
