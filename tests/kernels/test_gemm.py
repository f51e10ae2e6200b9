"""SmoothGEMM: every primitive against a float64 product, virtual padding, no recompiles per M,
the persistent stream-K primitive's split-tile reduction, the persistent tiles (whole tiles per
program, descriptor stores), and the cuBLAS dispatch of the table.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), which compiles nothing: there
the "no new kernel" checks compute the specialisation key Triton's JIT would cache the kernel
under (its own binder, on a shadow JITFunction). On a GPU they count the real JIT cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ascend_kernels import arrival_counters
from ascend_kernels import gemm as smooth
from ascend_kernels import gemm_persistent, gemm_streamk, gemv_rows
from ascend_kernels.gemm import smooth_gemm
from ascend_kernels.gemm_table import CUBLAS, GemmConfig, lookup, parse_table, table_json
from benchmarks.common import is_sm90

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RAGGED_M = (1, 3, 17, 100)
# The row-owner GEMV runs a program per token row (or pair): the interpreter takes ~30 ms a program,
# so its ragged M stay small (several row tiles, a ragged last one), as do the rows it is used for.
ROWS_M = (1, 2, 3, 5)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
PRIMITIVES = {
    "gemv16": GemmConfig(16, 32, 32, 1, 1, 4, 2),
    "gemv16-splitk": GemmConfig(16, 32, 16, 1, 2, 4, 2),
    "tile32": GemmConfig(32, 64, 32, 4, 1, 4, 2),
    "tile64": GemmConfig(64, 32, 32, 2, 1, 4, 3),
    "tile128": GemmConfig(128, 64, 64, 8, 1, 8, 3),
    # tensor-descriptor loads (Hopper bulk copies; the CPU interpreter emulates them)
    "gemv16-splitk-tma": GemmConfig(16, 32, 16, 1, 2, 4, 2, tma=True),
    "tile64-tma": GemmConfig(64, 32, 32, 2, 1, 4, 3, tma=True),
    # swap-AB: the weight on the MMA's M side (the tl.dot form; on an sm_90 GPU the Gluon kernel runs
    # configs with block_n = 16 x warps, tested in test_gpu_swap_hopper_kernel)
    "gemv16-swap": GemmConfig(16, 32, 32, 1, 1, 4, 2, swap_ab=True),
    "tile32-tma-swap": GemmConfig(32, 64, 32, 2, 2, 4, 2, tma=True, swap_ab=True),
    # the row-owner GEMV (no tl.dot): K pieces of 32 mask the last one, 16 divide K=80 evenly
    "rows1": GemmConfig(1, 32, 32, 1, 1, 4, 3),
    "rows2": GemmConfig(2, 16, 16, 1, 1, 4, 3),
    # three or four tokens: the Triton row-owner kernel here; gemv_rows_fma.py on an NVIDIA GPU
    "rows4": GemmConfig(4, 16, 32, 1, 1, 4, 3),
    # persistent tiles: programs = cores (4 under the interpreter) x persistent, each walking whole
    # tiles (M=100 at 32 x 32: 12 tiles over 4 programs); K=80 leaves a zero-filled last K tile
    "tile32-tma-p1-ws": GemmConfig(32, 32, 32, 2, 1, 4, 3, tma=True, persistent=1, warp_spec=True),
    "tile64-tma-p2": GemmConfig(64, 32, 16, 2, 1, 4, 3, tma=True, persistent=2),
}
# Persistent stream-K: programs = cores (4 under the interpreter, 132 on an H100/H200) x stream_k.
# On K=80, N=96 and the M below these cover fewer tiles than programs, a ragged last wave after
# whole data-parallel waves, exact waves (tile32-sk3 at M=100: 12 tiles, 12 programs), tiles split
# over up to 4 programs, and the masked-K path (BLOCK_K=32).
STREAM_K = {
    "gemv16-sk1": GemmConfig(16, 32, 16, 1, 1, 4, 2, stream_k=1),
    "tile32-sk3": GemmConfig(32, 32, 32, 2, 1, 4, 2, stream_k=3),
    "tile64-tma-sk2": GemmConfig(64, 32, 16, 2, 1, 4, 3, tma=True, stream_k=2),
}
ALL_PRIMITIVES = {**PRIMITIVES, **STREAM_K}
K, N = 80, 96  # K not a multiple of the K tiles above: the masked-K path runs too


def _operands(m, dtype, weight_kn, bias, k=K, n=N):
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = torch.randn(*((k, n) if weight_kn else (n, k)), dtype=dtype, device=DEVICE) / k**0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    return x, w, b


def _rel_err(out, x, w, b, weight_kn):
    wd = w.double() if weight_kn else w.double().T
    ref = x.double().reshape(-1, wd.shape[0]) @ wd
    if b is not None:
        ref = ref + b.double()
    got = out.double().reshape(ref.shape)
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item()


# Both weight layouts and the bias epilogue, each with every dtype: two layouts per dtype keep the
# interpreter run short (the bias and layout code paths do not depend on each other).
LAYOUTS = [(False, False), (True, True)]
LAYOUT_IDS = ["linear-nobias", "conv1d-bias"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitive_matches_float64(name, dtype, layout):
    weight_kn, bias = layout
    torch.manual_seed(0)
    for m in ROWS_M if PRIMITIVES[name].rows else RAGGED_M:
        x, w, b = _operands(m, dtype, weight_kn, bias)
        out = smooth_gemm(x, w, b, weight_kn, config=PRIMITIVES[name])
        assert out.shape == (m, N) and out.dtype == dtype and out.is_contiguous()
        assert _rel_err(out, x, w, b, weight_kn) < TOL[dtype], f"M={m}"
        assert _counters_zero(), f"M={m}: a split-K tile was not reduced exactly once"


SPLIT_K4 = GemmConfig(16, 32, 16, 1, 4, 4, 2)  # K=80 in slices of 32, 32, 16 and an empty one


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_split_k_sums_slices_in_a_fixed_order(layout):
    """The last slice to arrive sums every slice in slice order: the same bits on every launch (an
    empty slice included)."""
    weight_kn, bias = layout
    torch.manual_seed(6)
    for m in (1, 17):
        x, w, b = _operands(m, torch.float32, weight_kn, bias)
        first = smooth_gemm(x, w, b, weight_kn, config=SPLIT_K4)
        assert _rel_err(first, x, w, b, weight_kn) < TOL[torch.float32]
        for _ in range(2):
            assert torch.equal(smooth_gemm(x, w, b, weight_kn, config=SPLIT_K4), first)
        assert _counters_zero()


@pytest.mark.parametrize("weight_kn", [False, True], ids=["linear", "conv1d"])
def test_default_config_leading_dims_and_strided_x(weight_kn):
    torch.manual_seed(1)
    _, w, b = _operands(1, torch.float32, weight_kn, True)
    base = torch.randn(5, K + 8, 7, device=DEVICE)
    x = base[:, :K, :].transpose(1, 2)  # [5, 7, K], non-contiguous
    out = smooth_gemm(x, w, b, weight_kn, allow_cublas=False)  # the Triton default, on a GPU too
    assert out.shape == (5, 7, N) and out.is_contiguous()
    assert _rel_err(out, x, w, b, weight_kn) < TOL[torch.float32]
    x2 = base[:, :K, 0]  # 2-D with a row stride != K, passed as strides without a copy
    assert _rel_err(smooth_gemm(x2, w, b, weight_kn, allow_cublas=False), x2, w, b, weight_kn) < TOL[torch.float32]


def _counters_zero() -> bool:
    """Every split-K or stream-K launch must leave its arrival counters at zero (the next launch
    relies on it)."""
    return arrival_counters.all_zero()


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(STREAM_K))
def test_streamk_matches_float64(name, dtype, layout):
    weight_kn, bias = layout
    torch.manual_seed(10)
    for m in (1, 3, 17, 40, 100):
        x, w, b = _operands(m, dtype, weight_kn, bias)
        out = smooth_gemm(x, w, b, weight_kn, config=STREAM_K[name])
        assert out.shape == (m, N) and out.dtype == dtype and out.is_contiguous()
        assert _rel_err(out, x, w, b, weight_kn) < TOL[dtype], f"M={m}"
        assert _counters_zero(), f"M={m}: a split tile was not reduced exactly once"


def test_streamk_splits_tiles_and_programs_are_the_core_count():
    """The schedule really splits tiles here (else the reduction path would go untested)."""
    cfg = STREAM_K["gemv16-sk1"]
    programs = gemm_streamk.num_cores(torch.device(DEVICE)) * cfg.stream_k
    iters = -(-K // cfg.block_k)
    tiles = -(-3 // cfg.block_m) * -(-N // cfg.block_n)  # M=3
    assert tiles < programs and (tiles * iters) % programs != 0
    if DEVICE == "cpu":
        assert programs == 4


@pytest.mark.parametrize("name", ["rows1", "rows2", "gemv16", "gemv16-splitk", "tile64", "tile64-tma", "tile32-sk3",
                                  "tile64-tma-sk2", "tile32-tma-p1-ws", "tile64-tma-p2"])  # fmt: skip
def test_bucket_only_real_rows_written(name):
    """Grid sized for a 64-row bucket, real M from a device tensor: padded rows untouched."""
    torch.manual_seed(2)
    bucket = 64
    x_real, w, b = _operands(bucket, torch.float32, False, True)
    for m in (1, 3, 17) + (() if ALL_PRIMITIVES[name].rows else (40,)):
        x = x_real.clone()
        x[m:] = float("nan")  # never read: a NaN row would poison nothing else, but must stay out
        out = torch.full((bucket, N), float("nan"), device=DEVICE)
        num_tokens = torch.tensor([m], dtype=torch.int32, device=DEVICE)
        smooth_gemm(x, w, b, False, num_tokens=num_tokens, out=out, config=ALL_PRIMITIVES[name])
        assert _rel_err(out[:m], x[:m], w, b, False) < TOL[torch.float32], f"M={m}"
        assert torch.isnan(out[m:]).all(), f"M={m}: a padded row was written"


def test_host_m_writes_exactly_m_rows():
    torch.manual_seed(3)
    x, w, _ = _operands(100, torch.float32, False, False)
    out = torch.full((2, 50, N), float("nan"), device=DEVICE)
    smooth_gemm(x.view(2, 50, K), w, None, False, out=out, config=PRIMITIVES["tile128"])
    assert _rel_err(out, x, w, None, False) < TOL[torch.float32]  # every element written, finite


def test_persistent_tiles_run_their_kernel_or_fall_back_to_masked_loads(monkeypatch):
    """Descriptor-friendly operands take the persistent kernel; an x whose rows are not unit-stride
    (no descriptor possible) runs the same tiles through the tiled primitive's masked loads."""
    calls = []
    real = smooth.persistent_gemm
    monkeypatch.setattr(smooth, "persistent_gemm", lambda *args: calls.append(1) or real(*args))
    cfg = PRIMITIVES["tile64-tma-p2"]
    torch.manual_seed(9)
    x, w, b = _operands(37, torch.float32, False, True)
    assert _rel_err(smooth_gemm(x, w, b, False, config=cfg), x, w, b, False) < TOL[torch.float32]
    assert len(calls) == 1
    strided = torch.randn(37, 2 * K, device=DEVICE)[:, ::2]
    assert _rel_err(smooth_gemm(strided, w, b, False, config=cfg), strided, w, b, False) < TOL[torch.float32]
    assert len(calls) == 1
    # a bucket whose real M is 0: the descriptors span row 0 and no tile runs, so nothing is written
    out = torch.full((37, N), float("nan"), device=DEVICE)
    smooth_gemm(x, w, b, False, num_tokens=torch.zeros(1, dtype=torch.int32, device=DEVICE), out=out, config=cfg)
    assert len(calls) == 2 and torch.isnan(out).all()


# ---------------------------------------------------------------- one kernel per primitive, any M
def _shadow_binder(kernel, **overrides):
    """Triton's own argument binder for `kernel`, as its JIT would build it (no compile, no GPU)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kwargs = {**kernel.kwargs, **overrides}
    shadow = JITFunction(kernel.fn, **kwargs)
    return create_function_from_signature(shadow.signature, shadow.params, BaseBackend)


class _KeyRecorder:
    """Collects the JIT cache key of every launch of smooth_gemm's kernels."""

    def __init__(self, **overrides):
        self.gpu = DEVICE == "cuda"
        self.kernels = (smooth.smooth_gemm_kernel, gemm_streamk.smooth_gemm_streamk_kernel, gemv_rows.gemv_rows_kernel,
                        gemm_persistent.persistent_gemm_kernel)
        self.keys: set = set()
        if not self.gpu:
            self.binders = {id(k): _shadow_binder(k, **overrides) for k in self.kernels}

    def __enter__(self):
        if not self.gpu:
            for kern in self.kernels:
                kern.add_pre_run_hook(self._hook(kern))
        return self

    def _hook(self, kern):
        def record(*args, **kwargs):
            _, spec, options = self.binders[id(kern)](*args, **kwargs)
            self.keys.add((kern.fn.__name__, repr(spec), repr(sorted(options.items()))))

        return record

    def __exit__(self, *exc):
        if not self.gpu:
            for kern in self.kernels:
                kern.pre_run_hooks.clear()

    def count(self) -> int:
        if self.gpu:
            dev = torch.cuda.current_device()
            return sum(len(k.device_caches[dev][0]) for k in self.kernels)
        return len(self.keys)


@pytest.mark.parametrize("name", ["rows2", "gemv16", "gemv16-splitk", "tile64", "tile64-tma", "tile64-tma-sk2",
                                  "tile64-tma-p2"])  # fmt: skip
def test_new_m_compiles_no_new_kernel(name):
    cfg = ALL_PRIMITIVES[name]
    torch.manual_seed(4)
    _, w, b = _operands(1, torch.float16, False, True)
    with _KeyRecorder() as rec:
        smooth_gemm(torch.randn(cfg.block_m, K, dtype=torch.float16, device=DEVICE), w, b, False, config=cfg)
        first = rec.count()
        # 1 and multiples of 16 are the values Triton specialises ints on by default
        for m in (1, 2, 3, 16, 17) + (() if cfg.rows else (15, 32, 33, 64, 100, 128, 333)):
            smooth_gemm(torch.randn(m, K, dtype=torch.float16, device=DEVICE), w, b, False, config=cfg)
        assert first >= 1 and rec.count() == first


@pytest.mark.parametrize("name", ["tile64", "tile64-tma-sk2", "tile32-tma-p1-ws"])
def test_num_tokens_bucket_compiles_once(name):
    torch.manual_seed(5)
    x, w, _ = _operands(128, torch.float32, False, False)
    out = torch.empty(128, N, device=DEVICE)
    with _KeyRecorder() as rec:
        before = rec.count()
        for m in (128, 1, 16, 17, 99):
            smooth_gemm(x, w, None, False, num_tokens=torch.tensor([m], dtype=torch.int32, device=DEVICE),
                        out=out, config=ALL_PRIMITIVES[name])  # fmt: skip
        assert rec.count() - before <= 1
        after_first = rec.count()
        for m in (5, 64, 127):
            smooth_gemm(x, w, None, False, num_tokens=torch.tensor([m], dtype=torch.int32, device=DEVICE),
                        out=out, config=ALL_PRIMITIVES[name])  # fmt: skip
        assert rec.count() == after_first


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU key recorder itself")
def test_key_recorder_sees_specialisation():
    """Without do_not_specialize, Triton would key M=1, 16 and 17 apart: the recorder must see it."""
    _, w, _ = _operands(1, torch.float32, False, False)
    with _KeyRecorder(do_not_specialize=[]) as rec:
        for m in (1, 16, 17):
            smooth_gemm(torch.randn(m, K, device=DEVICE), w, None, False, config=PRIMITIVES["tile64"])
        assert rec.count() == 3


# ---------------------------------------------------------------- table
@pytest.fixture
def fake_table(tmp_path, monkeypatch):
    """Install a table under a fake TABLE_DIR: write(gpu, {(N, K): [(m_max, cfg, cublas), ...]})."""
    from ascend_kernels import gemm_table

    monkeypatch.setattr(gemm_table, "TABLE_DIR", tmp_path)

    def write(gpu, shapes):
        doc = table_json(gpu, shapes, {"dtype": "bfloat16"})
        (tmp_path / f"{gpu}.json").write_text(__import__("json").dumps(doc))
        gemm_table.load_table.cache_clear()
        smooth._planned.cache_clear()
        return doc

    yield write
    gemm_table.load_table.cache_clear()
    smooth._planned.cache_clear()


def test_table_lookup_round_trip(fake_table):
    from ascend_kernels import gemm_table

    small, mid = GemmConfig(16, 64, 256, 1, 2, 4, 4), GemmConfig(64, 128, 64, 8, 1, 4, 4, True, 1)
    big = GemmConfig(128, 256, 64, 8, 1, 8, 3)
    doc = fake_table("fake-gpu", {(N, K): [(512, big), (16, small, False), (128, mid, True)]})
    assert parse_table(doc)[(N, K)] == ((16, small, False), (128, mid, True), (512, big, False))
    assert doc["shapes"][f"{N}x{K}"][1]["dispatch"] == "cublas" and "dispatch" not in doc["shapes"][f"{N}x{K}"][0]
    got = [lookup(N, K, m, "fake-gpu") for m in (1, 16, 17, 128, 129, 4096)]
    assert got == [small, small, CUBLAS, CUBLAS, big, big]
    assert lookup(N, K, 100, "fake-gpu", allow_cublas=False) == mid
    # a shape (or a GPU) without a table: cuBLAS, else the default Triton primitive
    assert lookup(N + 1, K, 1, "fake-gpu") == CUBLAS and lookup(N, K, 1, "no-such-gpu") == CUBLAS
    assert lookup(N + 1, K, 1, "fake-gpu", allow_cublas=False) == gemm_table.default_config(1)
    assert lookup(N, K, 1, "cpu") == gemm_table.default_config(1)  # the interpreter runs Triton
    # fp32 on a GPU: the 16-bit tuned tiles would not fit in shared memory
    assert lookup(N, K, 100, "fake-gpu", itemsize=4) == CUBLAS
    assert lookup(N, K, 100, "fake-gpu", allow_cublas=False, itemsize=4) == gemm_table.default_config(100)
    old = {"shapes": {f"{N}x{K}": [{"m_max": 16, "config": {"block_m": 16}}]}}  # a round-1 table
    assert parse_table(old)[(N, K)] == ((16, GemmConfig(block_m=16), False),)


# ---------------------------------------------------------------- cuBLAS dispatch
def test_row_owner_ranges_serve_one_to_four_tokens(fake_table):
    """A table with the M = 1, 2 and 4 ranges sends one token to rows1, two to rows2, three and four to
    rows4 and five on to the tl.dot GEMV; the tuner offers the row-owner candidates on exactly those
    three ranges, each with its own BLOCK_M; and rows2 at two tokens matches float64."""
    from ascend_kernels.tune_gemm import candidates

    rows1, rows2, rows4, gemv = (PRIMITIVES[n] for n in ("rows1", "rows2", "rows4", "gemv16"))
    fake_table("fake-gpu", {(N, K): [(1, rows1, False), (2, rows2, False), (4, rows4, False), (16, gemv, False)]})
    assert [lookup(N, K, m, "fake-gpu") for m in (1, 2, 3, 4, 5, 16)] == [rows1, rows2, rows4, rows4, gemv, gemv]
    for m_max in (1, 2, 4):
        offered = [c for c in candidates(m_max) if c.rows]
        assert offered and all(c.block_m == m_max for c in offered)
    assert all(c.block_k == 256 * c.num_warps for c in candidates(4) if c.rows)  # the Gluon kernel's pieces
    assert not any(c.rows for m_max in (16, 32, 512) for c in candidates(m_max))
    x, w, b = _operands(2, torch.float32, False, True)
    assert _rel_err(smooth_gemm(x, w, b, False, config=rows2), x, w, b, False) < TOL[torch.float32]


def test_tuner_offers_persistent_tiles_for_large_m_and_swap_tiles_up_to_512():
    from ascend_kernels.tune_gemm import candidates

    incumbent = GemmConfig(128, 128, 64, 8, 1, 8, 3)
    assert any(c.persistent for c in candidates(512)) and any(c.persistent for c in candidates(4096, incumbent))
    assert not any(c.persistent for m_max in (1, 2, 16, 64, 256) for c in candidates(m_max))
    # swap-AB tiles: offered from 17 to 512 tokens, incumbent or not, and only in the Gluon kernel's shape
    for m_max in (32, 64, 128, 512):
        offered = [c for c in candidates(m_max, incumbent) if c.swap_ab]
        assert offered and all(c.tma and c.block_n == 16 * c.num_warps for c in offered)
    assert not any(c.swap_ab for m_max in (1, 2, 16, 1024, 4096) for c in candidates(m_max))


@pytest.mark.parametrize("weight_kn", [False, True], ids=["linear", "conv1d"])
def test_cublas_config_matches_float64(weight_kn):
    torch.manual_seed(11)
    for m in (1, 17):
        x, w, b = _operands(m, torch.float32, weight_kn, True)
        out = torch.full((m, N), float("nan"), device=DEVICE)
        smooth_gemm(x.view(1, m, K), w, b, weight_kn, out=out.view(1, m, N), config=CUBLAS)
        assert _rel_err(out, x, w, b, weight_kn) < TOL[torch.float32]
        for bias in (None, b):  # without out: the baseline's own call (F.linear / addmm)
            got = smooth_gemm(x.view(1, m, K), w, bias, weight_kn, config=CUBLAS)
            assert got.shape == (1, m, N) and got.is_contiguous()
            assert _rel_err(got, x, w, bias, weight_kn) < 1e-5


def test_table_dispatches_to_cublas_unless_forbidden(fake_table, monkeypatch):
    """A cuBLAS range runs F.linear (no Triton launch); allow_cublas=False runs the stored Triton
    config; with num_tokens cuBLAS computes the whole bucket, so only the real rows are checked."""
    from ascend_kernels.gemm_table import device_key

    tri = STREAM_K["tile32-sk3"]
    fake_table(device_key(), {(N, K): [(16, PRIMITIVES["gemv16"], False), (64, tri, True)]})
    ran = []
    for name in ("launch", "smooth_gemm_streamk", "_cublas"):
        real = getattr(smooth, name)
        monkeypatch.setattr(smooth, name, lambda *a, _n=name, _r=real: ran.append(_n) or _r(*a))
    torch.manual_seed(12)
    x, w, b = _operands(40, torch.float32, False, True)
    for allow, expect in ((True, "_cublas"), (False, "smooth_gemm_streamk")):
        ran.clear()
        assert _rel_err(smooth_gemm(x, w, b, False, allow_cublas=allow), x, w, b, False) < 1e-5
        assert ran == [expect]
    ran.clear()
    smooth_gemm(x[:3], w, b, False)
    assert ran == ["launch"]
    out = torch.empty(40, N, device=DEVICE)
    x[17:] = float("nan")  # padded rows: garbage in, garbage out on the cuBLAS path
    smooth_gemm(x, w, b, False, num_tokens=torch.tensor([17], dtype=torch.int32, device=DEVICE), out=out)
    assert _rel_err(out[:17], x[:17], w, b, False) < 1e-5


def test_config_validation():
    with pytest.raises(ValueError):
        GemmConfig(block_m=48)
    with pytest.raises(ValueError):
        GemmConfig(block_n=8)
    with pytest.raises(ValueError):
        GemmConfig(split_k=3)
    with pytest.raises(ValueError, match="row-owner"):
        GemmConfig(block_m=2, block_n=4, split_k=2)
    assert GemmConfig(16, 256, 512, 1, 4).fitted(96, 80) == GemmConfig(16, 128, 128, 1, 1)
    # the row-owner GEMV keeps tiles below tl.dot's 16
    assert GemmConfig(1, 4, 4096, 1, 1, 8, 3).fitted(96, 80) == GemmConfig(1, 4, 128, 1, 1, 8, 3)
    assert GemmConfig(1, 4, 64).primitive == "rows1" and not CUBLAS.rows
    for bad in (dict(persistent=1), dict(persistent=1, tma=True, split_k=2), dict(persistent=1, tma=True, stream_k=1),
                dict(warp_spec=True, tma=True), dict(persistent=9, tma=True)):
        with pytest.raises(ValueError, match="persistent"):
            GemmConfig(**bad)
    for bad in (dict(swap_ab=True, stream_k=1), dict(swap_ab=True, tma=True, persistent=1),
                dict(block_m=1, swap_ab=True, block_n=4)):
        with pytest.raises(ValueError, match="swap_ab"):
            GemmConfig(**bad)
    assert GemmConfig(32, 64, 256, 1, 2, 4, 4, tma=True, swap_ab=True).primitive == "tile32-tma-swap"
    p = GemmConfig(128, 256, 64, 8, 1, 4, 3, tma=True, persistent=1, warp_spec=True)
    assert p.primitive == "tile128-tma-p1-ws" and p.fitted(96, 80) == GemmConfig(
        128, 128, 64, 8, 1, 4, 3, tma=True, persistent=1, warp_spec=True)


@pytest.mark.parametrize("block_m,warps,cb,nbuf,split_k,bias", [(16, 4, 4, 4, 2, 0), (128, 8, 1, 6, 1, 1)])
def test_swap_hopper_kernel_compiles_for_sm90_without_a_gpu(block_m, warps, cb, nbuf, split_k, bias):
    """Catches Gluon API drift in the installed Triton (the kernel runs on Hopper GPUs only): compile it
    for sm_90 in a process without the CPU interpreter; the weight must sit on wgmma's M side (n = tokens)."""
    report = _compile_gluon("swap", block_m, warps, cb, nbuf, split_k, bias)
    assert report["tma"] and report["wgmma"] == [f"m64n{block_m}k16"], report
    assert report["shared"] >= nbuf * cb * 64 * (16 * warps + block_m) * 2


@pytest.mark.parametrize("block_n,warps,bias", [(2, 4, 0), (8, 4, 1)])
def test_rows_fma_kernel_compiles_without_a_gpu(block_n, warps, bias):
    """The rows4 kernel for sm_90: one 16-byte load per weight row, token row (and bias) a piece, the
    products summed within each thread (4 tokens x block_n rows x 8 columns: 7 FMAs a sum, which newer
    Triton may pack two to an instruction), nothing spilled."""
    report = _compile_gluon("rows4", block_n, warps, bias)
    assert report["ld_v4"] == block_n + 4 + bias and report["local"] == 0, report
    assert 4 * block_n * 7 // 2 <= report["fma"] <= 4 * block_n * 7, report


def _compile_gluon(kind: str, *args: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.kernels.compile_gemm_gluon", kind, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- GPU: bf16 numerics, graphs
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 17, 100, 333, 1000])
def test_gpu_bf16_llama_shapes(m):
    torch.manual_seed(6)
    for n, k in ((6144, 4096), (2048, 8192)):
        x, w, b = _operands(m, torch.bfloat16, False, True, k=k, n=n)
        assert _rel_err(smooth_gemm(x, w, b, False), x, w, b, False) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("weight_kn", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("name", sorted(ALL_PRIMITIVES))
def test_gpu_bf16_every_primitive(name, weight_kn):
    torch.manual_seed(8)
    c = ALL_PRIMITIVES[name]
    cfg = GemmConfig(c.block_m, 128, 64, c.group_m, c.split_k, c.num_warps, c.num_stages, c.tma, c.stream_k,
                     persistent=c.persistent, warp_spec=c.warp_spec, swap_ab=c.swap_ab)
    # 768 x 1024 with 132+ programs: at M=333 some tiles are split over several programs that run
    # at the same time, so the arrival counters really race here (unlike the interpreter).
    for m in (1, 3, 17, 100, 333, 1000):
        x, w, b = _operands(m, torch.bfloat16, weight_kn, True, k=1024, n=768)
        for _ in range(3):
            out = smooth_gemm(x, w, b, weight_kn, config=cfg)
            assert _rel_err(out, x, w, b, weight_kn) < TOL[torch.bfloat16], f"M={m}"
        assert _counters_zero()


# Gluon swap-AB configs (block_n = 16 x warps): every token tile width, one and two warpgroups,
# split-K with racing arrivals, chunks of 1, 2 and 4 boxes
SWAP_HOPPER = [GemmConfig(16, 64, 256, 1, 1, 4, 4, tma=True, swap_ab=True),
               GemmConfig(16, 64, 128, 1, 8, 4, 8, tma=True, swap_ab=True),
               GemmConfig(32, 128, 128, 1, 2, 8, 4, tma=True, swap_ab=True),
               GemmConfig(64, 64, 128, 1, 4, 4, 6, tma=True, swap_ab=True),
               GemmConfig(128, 128, 64, 1, 2, 8, 6, tma=True, swap_ab=True)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SWAP_HOPPER, ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}-sk{c.split_k}")
def test_gpu_swap_hopper_kernel(cfg):
    """The Gluon kernel itself (not the tl.dot form) on an sm_90 GPU: float64 match with and without
    bias, K not a multiple of the chunk, split-K counters left zero."""
    if not is_sm90():
        pytest.skip("the Gluon swap-AB kernel runs on sm_90 only")
    torch.manual_seed(10)
    for m in (1, 3, 17, 100, 333):
        x, w, b = _operands(m, torch.bfloat16, False, True, k=1000, n=768)
        assert smooth._swap_hopper(x, w, torch.empty(m, 768, dtype=x.dtype, device=x.device), False, cfg)
        for bias in (None, b):
            for _ in range(3):
                out = smooth_gemm(x, w, bias, False, config=cfg)
                assert _rel_err(out, x, w, bias, False) < TOL[torch.bfloat16], f"M={m}"
        assert _counters_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("block_n,warps", [(2, 2), (4, 4), (8, 8)])
def test_gpu_rows_fma_kernel(block_n, warps):
    """rows4 on a GPU is the Gluon kernel: float64 match with and without bias over several 4-row
    tiles, and one CUDA graph serving a bucket through num_tokens with the padded rows untouched."""
    torch.manual_seed(11)
    cfg = GemmConfig(4, block_n, 256 * warps, 1, 1, warps, 3)
    k, n = 2048, 384
    for m in (1, 3, 4, 5, 11):
        x, w, b = _operands(m, torch.bfloat16, False, True, k=k, n=n)
        assert smooth._rows_fma(x, w, torch.empty(m, n, dtype=x.dtype, device=x.device), False, cfg)
        for bias in (None, b):
            assert _rel_err(smooth_gemm(x, w, bias, False, config=cfg), x, w, bias, False) < TOL[torch.bfloat16]
    _assert_one_graph_serves_the_bucket(8, k, n, True, cfg, (1, 3, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("tma,stream_k,persistent,swap", [(False, 0, 0, 0), (True, 0, 0, 0), (False, 1, 0, 0),
                                                          (True, 1, 0, 0), (True, 0, 1, 0), (True, 0, 0, 1)],
                         ids=["masked", "tma", "streamk-masked", "streamk-tma", "persistent", "swap"])  # fmt: skip
def test_gpu_one_cuda_graph_serves_a_bucket(tma, stream_k, persistent, swap):
    torch.manual_seed(7)
    cfg = GemmConfig(64, 64 if swap else 128, 64, 8, 2 if swap else 1, 4, 3, tma=tma, stream_k=stream_k,
                     persistent=persistent, warp_spec=bool(persistent), swap_ab=bool(swap))
    if swap and is_sm90():
        x, w, _ = _operands(64, torch.bfloat16, False, False, k=2048, n=3072)
        assert smooth._swap_hopper(x, w, torch.empty(64, 3072, dtype=x.dtype, device=x.device), False, cfg)
    _assert_one_graph_serves_the_bucket(64, 2048, 3072, False, cfg, (1, 5, 17, 64))


def _assert_one_graph_serves_the_bucket(bucket, k, n, bias, cfg, token_counts):
    """Capture one smooth_gemm over `bucket` rows with the real M read from num_tokens; replay it at
    each token count on fresh x: the real rows match float64, the padded rows stay untouched (NaN)."""
    x, w, b = _operands(bucket, torch.bfloat16, False, bias, k=k, n=n)
    out = torch.empty(bucket, n, dtype=torch.bfloat16, device="cuda")
    num_tokens = torch.tensor([bucket], dtype=torch.int32, device="cuda")
    smooth_gemm(x, w, b, False, num_tokens=num_tokens, out=out, config=cfg)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        smooth_gemm(x, w, b, False, num_tokens=num_tokens, out=out, config=cfg)
    for m in token_counts:
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        num_tokens.fill_(m)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out[:m], x[:m], w, b, False) < TOL[torch.bfloat16]
        assert torch.isnan(out[m:]).all()


# ---------------------------------------------------------------- torch.compile: one graph, any M
class _Conv1D(torch.nn.Module):
    """GPT-2's Conv1D: addmm(b, x, W[K, N]) -> xyserve::gemm(weight_kn=True)."""

    def __init__(self, k, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(k, n) / k**0.5)
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.proj = _Conv1D(64, 48)
        self.down = torch.nn.Linear(48, 32, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.proj(torch.relu(self.up(x)))))


TOKENS = (1, 2, 3, 17, 100, 333, 512)


@pytest.mark.parametrize("unbacked", [True, False], ids=["unbacked", "dynamic"])
def test_compiled_model_any_token_count_no_recompile(unbacked, monkeypatch):
    """Under torch.compile(dynamic=True, impl="triton") every token count runs one graph.

    Dynamo itself specialises a size of 1 (its 0/1 rule): with a plain dynamic dim, T=1 gets its
    own graph and every T >= 2 shares the next one; marking the token dim unbacked (what the engine
    does) leaves one graph for all T. The kernels never add a specialisation of their own.
    """
    from torch._dynamo.utils import counters

    calls = []
    real = smooth.smooth_gemm
    monkeypatch.setattr(smooth, "smooth_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(9)
    model = _MLP().eval().to(DEVICE)  # CPU tensors only where the interpreter runs the kernels
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="xyserve", dynamic=True, options={"impl": "triton"})
    graphs = []
    with torch.no_grad():
        for t in TOKENS:
            x = torch.randn(1, t, 32, device=DEVICE)
            if unbacked:
                torch._dynamo.decorators.mark_unbacked(x, 1)
            out = compiled(x)
            ref = model(x)
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5, f"T={t}"
            graphs.append(counters["stats"]["unique_graphs"])
    assert len(calls) == 3 * len(TOKENS)  # all three linears ran through SmoothGEMM every time
    if unbacked:
        assert graphs == [1] * len(TOKENS)
    else:
        assert graphs == [1] + [2] * (len(TOKENS) - 1)
    assert not counters["recompiles"] or sum(counters["recompiles"].values()) <= (0 if unbacked else 1)
