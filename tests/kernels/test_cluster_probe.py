"""benchmarks/cluster_probe.py: its inline PTX (cluster special registers, mapa, remote mbarrier arrives,
cluster barriers) still assembles for sm_90, without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sm90 import requires_sm90

SCRIPT = """
import json
from benchmarks.cluster_probe import compile_probe
k = compile_probe()
ptx = k.asm["ptx"]
print(json.dumps({w: w in ptx for w in ("mapa.shared::cluster", "mbarrier.arrive.release.cluster", "barrier.cluster.wait",
                                         "%cluster_ctarank", "%dynamic_smem_size")}))
"""


def test_probe_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Gluon does not compile interpreted
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         check=False, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    found = __import__("json").loads(run.stdout.strip().splitlines()[-1])
    assert all(found.values()), found


@pytest.mark.gpu
@requires_sm90
def test_probe_runs_clusters_of_4():
    from benchmarks.cluster_probe import cluster_probe

    res = cluster_probe(4, 8, 64 * 1024, iters=10)  # 32 CTAs: co-resident on any sm_90 card
    assert res["coresident"] and res["dsmem_ok"] and res["ranks_are_pid_mod_cluster"], res
