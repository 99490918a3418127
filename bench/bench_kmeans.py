"""K-means (Lloyd) per iteration, fastlvm beside scikit-learn (lloyd, elkan), scikit-learn-intelex
(oneDAL) and faiss-cpu, from the same initial centres, in one interleaved run.

Every library gets the same data and initial centres and tol=0, so each runs max_iter full
iterations on data whose labels keep changing (overlapping clusters; sparse rows without
structure); each fit's n_iter_ is printed. Time per iteration is a fit's wall time over its
n_iter_, the median over rounds; libraries take turns within a round, under the same background
load. The GEMM fraction counts 2*N*K*D FLOPs per iteration, skipped distances counted as done;
the read-bandwidth fraction, the rows' N*D values read once per iteration (a pass over rows
larger than the L3 cache cannot run faster than that).
A peer that is not installed or fails is left out.

    python bench/bench_kmeans.py [--quick] [--cases dense-f32,sparse] [--rounds 3] [--threads 1] [--machine m.json]

--threads N limits every library to N threads (BLAS/OpenMP pools through threadpoolctl, Numba's
workers, faiss's OpenMP): on a shared machine single-thread ratios are the ones to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

SEED = 0


@dataclass
class Case:
    name: str
    n: int
    d: int
    k: int
    dtype: str
    iters: int
    target: float
    density: float = 1.0  # < 1: a CSR matrix

    @property
    def sparse(self):
        return self.density < 1.0


CASES = [
    Case("dense-f32", 200_000, 32, 16, "float32", 10, 2.5),
    Case("dense-f64", 200_000, 32, 16, "float64", 10, 2.5),
    Case("large-f32", 1_000_000, 64, 256, "float32", 20, 1.5),
    Case("sparse", 100_000, 20_000, 64, "float64", 10, 2.0, density=0.005),
]


def quick(c: Case) -> Case:
    return Case(c.name, max(2000, c.n // 50), c.d if not c.sparse else 2000, min(c.k, 32), c.dtype, 5, c.target,
                c.density if not c.sparse else 0.02)


def make_data(c: Case):
    """Overlapping Gaussian clusters (dense) or structureless random CSR rows, and K initial rows."""
    rng = np.random.default_rng(SEED)
    if c.sparse:
        import scipy.sparse as sp

        per_row = max(1, int(round(c.density * c.d)))  # (scipy's sp.random would draw from all n*d cells)
        cols = rng.integers(c.d, size=(c.n, per_row))
        X = sp.csr_matrix((rng.random(c.n * per_row).astype(c.dtype), cols.ravel(),
                           np.arange(0, c.n * per_row + 1, per_row)), shape=(c.n, c.d))
        X.sum_duplicates()
        init = X[rng.choice(c.n, c.k, replace=False)].toarray()
        return X, init
    means = rng.normal(size=(c.k, c.d))
    labels = rng.integers(c.k, size=c.n)
    X = (means[labels] * 0.35 + rng.normal(size=(c.n, c.d))).astype(c.dtype)
    init = X[rng.choice(c.n, c.k, replace=False)].copy()
    return X, init


def fastlvm_fit(X, init, c):
    from fastlvm import KMeans

    km = KMeans(c.k, init=init, n_init=1, max_iter=c.iters, tol=0.0).fit(X)
    return km.n_iter_, km.inertia_


def sklearn_fit(algorithm):
    def fit(X, init, c):
        from sklearn.cluster import KMeans

        km = KMeans(c.k, init=init, n_init=1, max_iter=c.iters, tol=0.0, algorithm=algorithm).fit(X)
        return km.n_iter_, km.inertia_

    return fit


def sklearnex_fit(X, init, c):
    from sklearnex.cluster import KMeans

    km = KMeans(c.k, init=init, n_init=1, max_iter=c.iters, tol=0.0).fit(X)
    return km.n_iter_, km.inertia_


def faiss_fit(X, init, c):
    import faiss

    if c.sparse:
        raise NotImplementedError("faiss takes dense float32 only")
    x = np.ascontiguousarray(X, dtype=np.float32)  # faiss computes in float32
    km = faiss.Kmeans(c.d, c.k, niter=c.iters, max_points_per_centroid=10**9, min_points_per_centroid=1,
                      seed=SEED, verbose=False)
    km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    return c.iters, float(km.obj[-1]) if len(km.obj) else float("nan")


LIBS = {
    "fastlvm": fastlvm_fit,
    "sklearn-lloyd": sklearn_fit("lloyd"),
    "sklearn-elkan": sklearn_fit("elkan"),
    "sklearnex": sklearnex_fit,
    "faiss": faiss_fit,
}


# Pause before each timed fit: BLAS and OpenMP worker threads spin for up to ~0.1 s after a parallel
# call, and threads left spinning by one library halved the next one's speed.
SETTLE_S = 0.3


def run_case(c: Case, libs, rounds: int):
    X, init = make_data(c)
    live, notes, times, iters, inertia = [], {}, {}, {}, {}
    for lib in libs:  # a first fit (JIT compilation, imports) that is not timed; failures drop the peer
        try:
            iters[lib], inertia[lib] = LIBS[lib](X, init, c)
            live.append(lib)
            times[lib] = []
        except Exception as e:  # noqa: BLE001 - a missing or failing peer is reported, not fatal
            notes[lib] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    for _ in range(rounds):
        for lib in live:
            time.sleep(SETTLE_S)  # the previous contender's spinning BLAS/OpenMP threads time out
            t0 = time.perf_counter()
            n_iter, _ = LIBS[lib](X, init, c)
            times[lib].append((time.perf_counter() - t0) / max(n_iter, 1))
    return {lib: {"s_per_iter": float(np.median(times[lib])), "n_iter": int(iters[lib]), "inertia": inertia[lib]}
            for lib in live}, notes


def _load_libraries(libs):
    """Import every library (and with it its BLAS and OpenMP pools) that is installed."""
    import importlib

    for lib in libs:
        for module in {"fastlvm": ["fastlvm.kernels.kmeans"], "sklearnex": ["sklearnex.cluster"],
                       "faiss": ["faiss"]}.get(lib, ["sklearn.cluster"]):
            try:
                importlib.import_module(module)
            except ImportError:
                pass


def fmt_ms(s):
    return f"{s * 1e3:9.2f} ms"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--libs", default=",".join(LIBS), help="comma-separated libraries")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="limit every library to this many threads")
    ap.add_argument("--machine", help="bench/machine.py --json output (GEMM rate); measured here if absent")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        import numba
        from threadpoolctl import threadpool_limits

        _load_libraries(args.libs.split(","))  # threadpoolctl limits only the pools loaded by then
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        threadpool_limits(args.threads)  # kept for the whole run
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass

    if args.machine and os.path.exists(args.machine):
        with open(args.machine) as f:
            machine = json.load(f)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from machine import measure

        machine = measure(quick=args.quick)
    gemm = machine["gemm_gflops"]
    read_gbs = machine.get("read_gbs")  # absent from machine files written before it was measured
    cases = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    cases = [quick(c) for c in cases] if args.quick else cases
    libs = args.libs.split(",")
    out = {"machine": machine, "cases": [], "results": []}
    lines = [f"k-means (Lloyd), time per iteration from the same initial centres, tol=0; "
             f"GEMM {gemm['float32']:.0f} / {gemm['float64']:.0f} GFLOP/s f32 / f64"
             + (f", memory read {read_gbs:.1f} GB/s" if read_gbs else "") + f" on this machine ({os.cpu_count()} CPUs)"]
    for c in cases:
        kind = f"CSR density {c.density:g}" if c.sparse else "dense"
        first = len(lines)
        lines.append(f"\n{c.name}: N={c.n:,} D={c.d:,} K={c.k} {c.dtype} {kind}, {c.iters} iterations "
                     f"(target >= {c.target:g}x sklearn-lloyd)")
        res, notes = run_case(c, libs, args.rounds)
        out["cases"].append(c.__dict__)
        ref = res.get("sklearn-lloyd")
        fast = res.get("fastlvm")
        for lib in libs:
            if lib in notes:
                lines.append(f"  {lib:<14} left out ({notes[lib]})")
                continue
            if lib not in res:
                continue
            r = res[lib]
            flop = 2.0 * c.n * c.k * c.d
            gemm_part = "" if c.sparse else f"  {flop / r['s_per_iter'] / 1e9 / gemm[c.dtype]:6.1%} of GEMM"
            if not c.sparse and read_gbs:  # the rows read once an iteration, against the measured read rate
                row_bytes = c.n * c.d * np.dtype(c.dtype).itemsize
                gemm_part += f"  {row_bytes / r['s_per_iter'] / 1e9 / read_gbs:6.1%} of read bandwidth"
            vs = f"  fastlvm speed-up {r['s_per_iter'] / fast['s_per_iter']:5.2f}x" if fast and lib != "fastlvm" else ""
            ratio = f"  {ref['s_per_iter'] / r['s_per_iter']:5.2f}x sklearn-lloyd" if ref else ""
            lines.append(f"  {lib:<14}{fmt_ms(r['s_per_iter'])}/iter  n_iter_={r['n_iter']:<4}{ratio}{gemm_part}{vs}")
            out["results"].append({"case": c.name, "lib": lib, **r})
        if fast and ref:
            ratio = ref["s_per_iter"] / fast["s_per_iter"]
            lines.append(f"  -> fastlvm {ratio:.2f}x sklearn-lloyd: target {'met' if ratio >= c.target else 'NOT met'}")
        print("\n".join(lines[first:]), file=sys.stderr, flush=True)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
