"""This machine's ceilings, measured now: large-GEMM GFLOP/s and parallel copy bandwidth,
beside what it is and which code paths run (fastlvm.show_config: CPU model, ISA features, the
C++ kernels' ISA path, Numba's target CPU, BLAS core type and threads).

The benchmark tables divide by these figures, so a ratio means the same thing on a
busy machine as on a quiet one. Every bench prints ``describe(measure())`` first. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are read by
OpenBLAS when numpy is first imported, so their effect can only be seen from a fresh
process: bench/run.py runs this script with and without them.

    python bench/machine.py [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def blas_info() -> dict:
    """The BLAS numpy uses, the core type its kernels were chosen for, and the variables that steer it."""
    import numpy  # noqa: F401  (loads the BLAS so that threadpoolctl can see it)
    from threadpoolctl import threadpool_info

    blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    first = blas[0] if blas else {}
    return {
        "blas": f"{first.get('internal_api', '?')} {first.get('version', '?')}",
        "core_type": first.get("architecture", "?"),
        "blas_threads": first.get("num_threads", 0),
        "env": {name: os.environ.get(name) for name in OPENBLAS_VARS},
    }


def gemm_gflops(dtype: str, n: int = 4096, repeats: int = 3) -> float:
    """Best rate of an n x n by n x n matmul; 2 n^3 FLOP each."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=c)  # warm: threads started, pages touched
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best GB/s of a parallel (numba prange) copy, counting the bytes read plus the bytes written."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=False)
    def copy(src, dst):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    n = nbytes // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.zeros(n, dtype=np.float64)  # zeros + the warm copy touch every page before timing
    copy(src, dst)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy(src, dst)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * 8 / best / 1e9


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best GB/s of a parallel (numba prange) sum, counting the bytes read: the limit of a pass that
    streams its rows from memory (k-means on rows larger than the L3 cache)."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=False, fastmath=True)
    def total(src):
        acc = 0.0
        for i in numba.prange(src.size):
            acc += src[i]
        return acc

    src = np.ones(nbytes // 8, dtype=np.float64)
    total(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(src)
        best = min(best, time.perf_counter() - t0)
    return src.nbytes / best / 1e9


def measure(quick: bool = False) -> dict:
    n = 1024 if quick else 4096
    mib = 64 if quick else 512
    out = blas_info()
    out["gemm_n"] = n
    out["gemm_gflops"] = {dt: gemm_gflops(dt, n=n) for dt in ("float32", "float64")}
    out["copy_mib"] = mib
    out["copy_gbs"] = copy_bandwidth(mib * 2**20)
    out["read_gbs"] = read_bandwidth(mib * 2**20)
    out["cpus"] = os.cpu_count()
    from fastlvm._config import config, format_config

    out["config"] = config()
    out["config_text"] = format_config(out["config"])  # so describe() needs no import
    return out


def describe(m: dict) -> str:
    env = ", ".join(f"{k}={v}" for k, v in m["env"].items() if v is not None) or "neither set"
    g = m["gemm_gflops"]
    return (
        (m["config_text"] + "\n" if "config_text" in m else "") +
        f"BLAS {m['blas']} core type {m['core_type']} ({m['blas_threads']} threads; "
        f"OPENBLAS vars: {env})\n"
        f"GEMM {m['gemm_n']}^3: {g['float32']:.0f} GFLOP/s float32, {g['float64']:.0f} GFLOP/s float64; "
        f"parallel copy of {m['copy_mib']} MiB: {m['copy_gbs']:.1f} GB/s (read + write)"
        + (f"; parallel read: {m['read_gbs']:.1f} GB/s" if "read_gbs" in m else "")
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    m = measure(quick=args.quick)
    print(describe(m))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f)
    return m


if __name__ == "__main__":
    main()
