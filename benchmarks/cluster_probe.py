"""Can a persistent grid run as thread-block clusters on this card? For each cluster size: how many clusters
fit at once (cuOccupancyMaxActiveClusters, one CTA per SM at the decode kernel's shared memory), whether a
128-CTA grid of them is co-resident (a bounded spin on a grid counter), whether DSMEM stores and remote
mbarrier arrives from inline PTX in Gluon work, and what a cluster-wide sync costs on an idle card.

Why: the batch-1 decode kernel (ascend_kernels/decode_step_kernel.py) pays a grid-wide counter per stage;
a KV group's q/k/v -> attention -> o exchange could stay inside a cluster if 128 CTAs fit as clusters. On
the H200 of session 15 they do not (15 clusters of 8, 7 of 16, 30 of 4: benchmarks/RESULTS.md), so the
kernel has no cluster path. A persistent kernel whose grid is not co-resident deadlocks; the probe's spin
is bounded, so it reports instead.

The probe is compiled like any Gluon kernel and launched through Triton's launcher with the cluster size in
its packed metadata (the launcher then sets the cluster dimension, and the non-portable attribute at 16).
Its scratch (barriers, a data word) sits in dynamic shared memory past Triton's, found from
%dynamic_smem_size: Gluon has no address of its own shared allocations to hand to `mapa`.

    python -m benchmarks.cluster_probe      (sm_90; seconds)
"""
from __future__ import annotations

import ctypes

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from benchmarks.common import card_name, cli, is_sm90

EXTRA = 1024  # scratch bytes at the end of dynamic smem: [0, 16) and [16, 32) sync barriers, [32, 48) ring barrier, 64 data
_SCRATCH = gl.constexpr("{ .reg .u32 t; mov.u32 t, %dynamic_smem_size; mov.u32 $0, global_smem; add.u32 $0, $0, t; "
                        f"sub.u32 $0, $0, {EXTRA}; }}")
_T0 = gl.constexpr("{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; ")  # thread 0 only


@gluon.jit
def _sreg(x, NAME: gl.constexpr):
    return gl.inline_asm_elementwise("mov.u32 $0, " + NAME + ";", "=r,r", [x], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _scratch(x):
    return gl.inline_asm_elementwise(_SCRATCH, "=r,r", [x], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _init_barrier(bar, count):  # thread 0
    return gl.inline_asm_elementwise(_T0 + "@p mbarrier.init.shared::cta.b64 [$1], $2; mov.u32 $0, 0; }",
                                     "=r,r,r", [bar, count], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _cluster_sync(x, FENCE: gl.constexpr):  # every thread of the cluster
    return gl.inline_asm_elementwise(
        "{ " + FENCE + "barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned; mov.u32 $0, 0; }",
        "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _wait(bar, parity):  # every thread polls its CTA's barrier
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; W: mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [$1], $2; @!p bra W; "
        "mov.u32 $0, 0; }", "=r,r,r", [bar, parity], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _arrive_everywhere(bar, n):  # thread 0 arrives on `bar` of every CTA of the cluster, one after another
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t, r, a; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; @!p bra D; mov.u32 r, 0; "
        "L: mapa.shared::cluster.u32 a, $1, r; mbarrier.arrive.release.cluster.shared::cluster.b64 _, [a]; "
        "add.u32 r, r, 1; setp.lt.u32 p, r, $2; @p bra L; D: mov.u32 $0, 0; }",
        "=r,r,r", [bar, n], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _now(x):
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def cluster_probe_kernel(
    out_ptr,  # [G, 8] int32 per CTA: rank, cluster size, cluster id, SM, DSMEM word, counter seen, ns per sync
    cnt_ptr,  # [1] int32 grid counter, zero at launch
    G, ITERS, SPIN,
):
    dummy = gl.allocate_shared_memory(gl.int32, [32], gl.SwizzledSharedLayout(1, 1, 1, [0]))  # declares global_smem
    dummy.store(gl.zeros([32], gl.int32, gl.BlockedLayout([1], [32], [gl.num_warps()], [0])))
    pid = gl.program_id(0)
    rank, n = _sreg(pid, "%cluster_ctarank"), _sreg(pid, "%cluster_nctarank")
    base = _scratch(pid)
    _init_barrier(base, n)
    _init_barrier(base + 16, n)
    _init_barrier(base + 32, 1)
    _cluster_sync(pid, "fence.mbarrier_init.release.cluster; ")  # no remote arrive before every init
    # DSMEM: rank + 100 into the next CTA's data word, then an arrive on its count-1 barrier
    gl.inline_asm_elementwise(
        _T0 + "mapa.shared::cluster.u32 t, $1, $3; @p st.shared::cluster.u32 [t], $2; mapa.shared::cluster.u32 t, $4, $3; "
        "@p mbarrier.arrive.release.cluster.shared::cluster.b64 _, [t]; mov.u32 $0, 0; }",
        "=r,r,r,r,r", [base + 64, rank + 100, (rank + 1) % n, base + 32], dtype=gl.int32, is_pure=False, pack=1)
    _wait(base + 32, 0)
    got = gl.inline_asm_elementwise("ld.shared.u32 $0, [$1];", "=r,r", [base + 64], dtype=gl.int32, is_pure=False,
                                    pack=1)
    t0 = _now(pid)
    for it in range(ITERS):  # cluster-wide syncs on two alternating count-n barriers (one would overcount)
        bar = base + 16 * (it % 2)
        _arrive_everywhere(bar, n)
        _wait(bar, (it // 2) % 2)
    t1 = _now(pid)
    gl.atomic_add(cnt_ptr, 1, sem="release")  # co-residency: a bounded spin
    seen = gl.atomic_add(cnt_ptr, 0, sem="acquire")
    k = 0
    while (seen < G) & (k < SPIN):
        seen = gl.atomic_add(cnt_ptr, 0, sem="acquire")
        k += 1
    o = out_ptr + pid * 8
    gl.store(o, rank)
    gl.store(o + 1, n)
    gl.store(o + 2, _sreg(pid, "%clusterid.x"))
    gl.store(o + 3, _sreg(pid, "%smid"))
    gl.store(o + 4, got)
    gl.store(o + 5, seen)
    gl.store(o + 6, ((t1 - t0) // gl.maximum(ITERS, 1)).to(gl.int32))
    _cluster_sync(pid, "")  # no CTA leaves while another may still touch its shared memory


def max_active_clusters(function: int, shared: int, cluster: int, threads: int) -> int:
    """cuOccupancyMaxActiveClusters (ctypes); also raises the function's dynamic smem limit and allows
    non-portable cluster sizes, which the launch needs too."""
    cuda = ctypes.CDLL("libcuda.so.1")

    class Dim(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]

    class Value(ctypes.Union):
        _fields_ = [("clusterDim", Dim), ("pad", ctypes.c_char * 64)]

    class Attr(ctypes.Structure):
        _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", Value)]

    class Config(ctypes.Structure):
        _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                    ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(Attr)), ("num_attrs", ctypes.c_uint)]

    f = ctypes.c_void_p(function)
    for attribute, value in ((8, shared), (14, 1)):  # MAX_DYNAMIC_SHARED_SIZE_BYTES, NON_PORTABLE_CLUSTER_SIZE_ALLOWED
        if cuda.cuFuncSetAttribute(f, attribute, ctypes.c_int(value)) != 0:
            raise RuntimeError(f"cuFuncSetAttribute({attribute}) failed")
    attr = Attr(id=4)  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value.clusterDim = Dim(cluster, 1, 1)
    config = Config((cluster, 1, 1), (threads, 1, 1), shared, None, ctypes.pointer(attr), 1)
    count = ctypes.c_int(-1)
    if cuda.cuOccupancyMaxActiveClusters(ctypes.byref(count), f, ctypes.byref(config)) != 0:
        raise RuntimeError("cuOccupancyMaxActiveClusters failed")
    return count.value


def compile_probe(arch: int = 90):
    """The probe compiled for sm_`arch` (a CompiledKernel; needs no GPU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {"out_ptr": "*i32", "cnt_ptr": "*i32", "G": "i32", "ITERS": "i32", "SPIN": "i32"}
    return triton.compile(GluonASTSource(cluster_probe_kernel, sig), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": 8})


def cluster_probe(cluster: int, num_clusters: int, shared: int, iters: int = 1000) -> dict:
    kernel = compile_probe()
    kernel._init_handles()
    grid = cluster * num_clusters
    fit = max_active_clusters(kernel.function, shared, cluster, 32 * kernel.metadata.num_warps)
    out = torch.full((grid, 8), -1, dtype=torch.int32, device="cuda")
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    meta = (kernel.metadata.num_warps, cluster, shared)  # the launcher's (num_warps, num_ctas, shared)
    kernel.run(num_clusters, 1, 1, torch.cuda.current_stream().cuda_stream, kernel.function, meta, None, None, None,
               out, cnt, grid, iters, 2_000_000)
    torch.cuda.synchronize()
    o = out.cpu()
    return {"cluster": cluster, "num_clusters": num_clusters, "shared": shared, "max_active_clusters": fit,
            "coresident": bool((o[:, 5] >= grid).all()),
            "dsmem_ok": all(int(o[i, 4]) == (int(o[i, 0]) - 1) % int(o[i, 1]) + 100 for i in range(grid)),
            "ranks_are_pid_mod_cluster": all(int(o[i, 0]) == i % cluster for i in range(grid)),
            "sync_ns_median": float(o[:, 6].float().median()), "sms": len({int(s) for s in o[:, 3]})}


def run(quick: bool = False) -> dict:
    if not is_sm90():
        return {"skipped": "needs an sm_90 GPU"}
    res = {"card": card_name(), "probes": []}
    for cluster in (4, 8, 16):
        res["probes"].append(cluster_probe(cluster, 128 // cluster, 150 * 1024))
    return res


def table(res: dict) -> str:
    if "probes" not in res:
        return str(res)
    lines = [f"{res['card']}: a 128-CTA grid as clusters, 150 KB of shared memory a CTA",
             "| cluster | clusters that fit | co-resident | DSMEM | one cluster sync (idle) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p['cluster']} | {p['max_active_clusters']} of {p['num_clusters']} | {p['coresident']} | "
              f"{p['dsmem_ok']} | {p['sync_ns_median']:.0f} ns |" for p in res["probes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, table)
