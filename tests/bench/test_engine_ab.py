"""The ab_* scripts' shared engine A/B (benchmarks/engine_ab.py), on a tiny model on the CPU."""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

from benchmarks.engine_ab import engine_ab
from tests.engine.engine_models import build_model


def _token_zero():
    """Greedy rows take token 0: a variant whose tokens differ from the model's."""
    from xy_inductor.engine import sampler

    return mock.patch.object(sampler, "argmax_rows",
                             lambda logits, chunked=None: torch.zeros(logits.shape[0], dtype=torch.long))


def test_variants_alternate_and_their_tokens_are_compared():
    res = engine_ab(build_model("llama"), {"a": contextlib.nullcontext, "b": contextlib.nullcontext,
                                           "zeros": _token_zero},
                    batches=(2, 1), rounds=2, repeats=1, prompt_len=5, new_tokens=3, max_model_len=64)
    for name in ("a", "b", "zeros"):
        for b in (2, 1):
            runs = res[f"{name}/bs{b}"]["runs_ms"]
            assert len(runs) == 2 and all(r > 0 for r in runs)
            assert res[f"{name}/bs{b}"]["tok_s"] > 0
    # a and b agree, the zeros variant does not: the comparison covers every variant
    assert res["tokens_equal_bs2"] is False and res["tokens_equal_bs1"] is False
    same = engine_ab(build_model("llama"), {"a": contextlib.nullcontext, "b": contextlib.nullcontext},
                     batches=(2,), rounds=1, repeats=1, prompt_len=5, new_tokens=3, max_model_len=64)
    assert same["tokens_equal_bs2"] is True
