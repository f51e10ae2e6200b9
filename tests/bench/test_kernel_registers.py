"""The no-GPU register report compiles the meta-attention kernel for sm_90 and reads ptxas's counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from benchmarks import kernel_registers

ROOT = Path(__file__).resolve().parents[2]


def _has_ptxas() -> bool:
    return any(os.path.exists(kernel_registers._tool(n)) for n in ("ptxas", "ptxas-blackwell"))


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton wheel ships no ptxas (no NVIDIA backend)")
def test_register_report_of_the_decode_variant():
    # a fresh process: this test session runs the kernels in the interpreter (TRITON_INTERPRET=1),
    # whose functions cannot be compiled; the memory variant's tiles keep the compile short
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_registers", "--json", "--warps", "4",
                          "--stages", "2", "--set", "LARGE_M=64", "SMALL_N=64"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["triton"] == triton.__version__
    assert 0 < report["registers"] <= 255
    assert report["spill_store_bytes"] >= 0 and report["shared_bytes"] > 0
    kv_loops = [loop for loop in report["loops"] if loop["mma"] > 0]
    assert kv_loops, "the KV loops (with MMA instructions) must show up as loops in the SASS"
    assert all(loop["instructions"] >= loop["mma"] + loop["spill_ops"] for loop in report["loops"])


def test_the_interpreter_and_unknown_constexprs_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernel_registers.compile_ptx({}, 4, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="not parameters"):
        kernel_registers.compile_ptx({"NOT_A_PARAM": 1}, 4, 2)
