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
