"""xyserve: XY-Serve meta-kernels and a hybrid prefill/decode/verify engine for HF decoders.

    model = torch.compile(model, backend="xyserve")     # by name, no import needed
    llm = xy_inductor.LLM(model_or_path); llm.generate(prompts, SamplingParams(max_tokens=64))
"""
from __future__ import annotations

import importlib

# name -> module; resolved lazily so `import xy_inductor` stays cheap and import-cycle free.
_PUBLIC = {
    "LLM": "xy_inductor.engine.llm",
    "SamplingParams": "xy_inductor.config",
    "EngineConfig": "xy_inductor.config",
    "CompileOptions": "xy_inductor.config",
    "SpeculativeConfig": "xy_inductor.config",
    "accelerate": "xy_inductor.generate_dropin",
    "explain": "xy_inductor.explainer",  # not explain.py: a submodule would shadow the function
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'xy_inductor' has no attribute {name!r}")
