"""Shared benchmark helpers: the card, its measured ceilings, model shapes, timing."""
from __future__ import annotations

import logging
import time
import traceback

import torch
from transformers import LlamaConfig


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def is_sm90() -> bool:
    """An sm_90 (Hopper) GPU: what the Gluon kernels (and their benchmarks and tests) need."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def card_slug() -> str:
    """File-name form of the card, e.g. 'nvidia-h100-80gb-hbm3'."""
    return "".join(c if c.isalnum() else "-" for c in card_name().lower()).strip("-")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def card_rates() -> dict:
    """This card's bf16 matmul rate and device copy bandwidth, measured now (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=50, rep=300, return_mode="median")
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms_copy = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return {"matmul_flops": 2 * 8192**3 / (ms * 1e-3), "copy_bytes_per_s": 2 * src.numel() * 2 / (ms_copy * 1e-3)}


def llama_config(size: str) -> LlamaConfig:
    """Real architecture shapes (weights are random): 'llama-3.2-1b', 'llama-3-8b', or 'tiny'."""
    if size == "tiny":
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    if size == "llama-3.2-1b":
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                           rope_theta=500000.0, tie_word_embeddings=True)
    if size == "llama-3-8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                           rope_theta=500000.0)
    raise ValueError(f"unknown model size {size!r}")


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float32 (the decode probes' accuracy figure)."""
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def timed_runs(fn, repeats: int = 1) -> tuple[list[float], object]:
    """Wall seconds of each of `repeats` runs after one warm-up run (which also compiles);
    repeats=0 times the single run (for callers that warm up on their own)."""
    result = None if repeats == 0 else fn()
    times = []
    for _ in range(max(repeats, 1)):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return times, result


def median_run(times: list[float]) -> float:
    """The median of run times (the upper one for an even count)."""
    return sorted(times)[len(times) // 2]


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Median wall seconds of `repeats` runs after one warm-up run (see median_run); repeats=0 times
    the single run."""
    times, result = timed_runs(fn, repeats)
    return median_run(times), result


def allow_many_graphs(limit: int = 64) -> None:
    """One process runs many compiled variants of the same `forward` (HF static cache at two
    batch sizes, the engine, ...). Dynamo keeps them all on one code object, and past its default
    limit of 8 entries it silently runs eagerly: a baseline would then be timed uncompiled."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * limit)
    log_recompiles()


class _RecompileLog(logging.Handler):
    """Keeps Dynamo's recompile reasons (the `recompiles` log artifact) for the results."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().splitlines()
        self.reasons.append(" | ".join(line.strip() for line in lines[1:4]))


_RECOMPILES = _RecompileLog()


def log_recompiles() -> None:
    """Record why Dynamo recompiled (also printed on stderr): attached to every result by attempt()."""
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    if _RECOMPILES not in logger.handlers:
        torch._logging.set_logs(recompiles=True)
        logger.addHandler(_RECOMPILES)


def recompile_reasons() -> list[str]:
    """The reasons recorded since log_recompiles(), oldest first."""
    return list(_RECOMPILES.reasons)


def dynamo_counts() -> dict:
    """Graphs Dynamo has compiled in this process (a recompile is one more graph for a frame)."""
    return {"graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def attempt(results: dict, name: str, fn) -> None:
    """Run one variant; a failure is recorded in the results (and printed), never fatal. Each
    result also gets its wall time (compile and warm-up included) and the graphs Dynamo compiled
    while it ran."""
    before, start, seen = dynamo_counts(), time.perf_counter(), len(_RECOMPILES.reasons)
    try:
        results[name] = fn()
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        traceback.print_exc()
    if isinstance(results[name], dict):
        after = dynamo_counts()
        results[name]["wall_s"] = time.perf_counter() - start
        results[name]["dynamo"] = {k: after[k] - before[k] for k in after}
        if len(_RECOMPILES.reasons) > seen:
            results[name]["dynamo"]["recompile_reasons"] = _RECOMPILES.reasons[seen:][:5]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def cli(run, table, flags: dict[str, str] | None = None) -> None:
    """`python -m benchmarks.bench_x [--quick] [--flag ...]`: the JSON, then the table. `flags`: more
    on/off options (name: help), passed to `run` as keyword arguments."""
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    for name, help_text in (flags or {}).items():
        p.add_argument(f"--{name}", action="store_true", help=help_text)
    args = vars(p.parse_args())
    res = run(args.pop("quick"), **args)
    print(json.dumps(res, indent=1, default=str))
    print(table(res))
