"""The benchmark suite's CPU smoke run writes a well-formed result file (numbers only on a GPU)."""
from __future__ import annotations

import json

from benchmarks import run as bench_run


def test_smoke_run_writes_a_well_formed_report(tmp_path):
    report = bench_run.main(["--smoke", "--out", str(tmp_path)])
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["cpu.json"]
    saved = json.loads(files[0].read_text())
    assert saved["card"] == "cpu" and saved["quick"] is True
    assert set(saved["suites"]) == {name for name, _, _ in bench_run.SUITES}
    for name, _, needs_gpu in bench_run.SUITES:
        suite = saved["suites"][name]
        assert "error" not in suite, (name, suite.get("error"))
        if needs_gpu:
            assert suite == {"skipped": "needs a GPU"}
        else:
            assert suite["suite_seconds"] > 0 and suite["table"]
    assert saved["suites"]["engine"]["correctness"]["equal_to_hf"] == saved["suites"]["engine"]["correctness"]["prompts"]
    assert all(p.endswith(".png") for p in report["plots"]) and len(report["plots"]) >= 3


def test_attention_checks_name_what_failed_and_keep_going():
    """A correctness case that raises (a kernel that does not compile) or exceeds its dtype's
    tolerance is recorded and named in the table; the other cases still run."""
    from benchmarks import attention_cases, bench_attention

    def fails_to_compile():
        raise RuntimeError("out of resource")

    res = {}
    attention_cases._case(res, "fp32_d128", fails_to_compile)
    attention_cases._case(res, "decode_bf16", lambda: 3e-3)
    attention_cases._case(res, "prefill_fp16", lambda: 5e-3)
    attention_cases._case(res, "store_kv_mismatches", lambda: 0.0)
    assert res["fp32_d128"].startswith("error: RuntimeError") and res["decode_bf16"] == 3e-3
    failed = attention_cases.failed_checks(res)
    assert failed == ["fp32_d128", "prefill_fp16"]
    row = {"ours_us": 1.0, "configs": {"auto": 1.0}, "best_config": "auto", "floor_us": 1.0, "ours_TFLOPs": 1.0,
           "ours_GBps": 1.0}
    fake = {"device": "x", "torch": "t", "triton": "3", "ceilings": {"bw_GBps": 1.0, "mm_TFLOPs": 1.0},
            "correctness_rel_err_vs_fp64": res, "correctness_failed": failed,
            **{name: row for name in ("mixed", "prefill", "decode", "verify", "long_decode")}}
    text = bench_attention.table(fake)
    assert "CORRECTNESS FAILED: fp32_d128, prefill_fp16" in text and "error: RuntimeError" in text
    assert "within its tolerance" in bench_attention.table({**fake, "correctness_failed": []})
