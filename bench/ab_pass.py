"""A/B of kernel-module versions on one fit's passes, in one process, interleaved round by round.

The host's own drift (10-20% over minutes on shared 2-vCPU machines) hides changes of a few percent
between separate processes. Here one fit's passes are recorded once (k-means: the LloydState.assign
calls of a bench fit; GMM: the last statistics pass of a 2-iteration fit), then replayed through
each version of the kernel module, imported side by side, in turn, for the given rounds; the
ratios of the medians to the first version, and how often each beat the first in the same round,
are printed.

    git show HEAD:fastlvm/kernels/kmeans.py > /tmp/old.py; cp fastlvm/kernels/kmeans.py /tmp/new.py
    python bench/ab_pass.py kmeans --case dense-f32 --threads 2 --rounds 20 /tmp/old.py /tmp/new.py
    python bench/ab_pass.py gmm --cov diag --dtype float32 --threads 1 /tmp/old_cpu.py /tmp/new_cpu.py

A version is a copy of fastlvm/kernels/kmeans.py (kmeans) or fastlvm/kernels/cpu.py (gmm), outside
the package; the other modules are the installed ones. Everything is compiled afresh (a temporary
NUMBA_CACHE_DIR), which takes a minute.
"""

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings

# Numba keys a kernel's disk cache on its own source file, not on the modules it inlines (simd.py):
# a cache of its own per run, so that every version is compiled from the code as it stands.
CACHE = tempfile.mkdtemp(prefix="ab_pass_numba_")
os.environ["NUMBA_CACHE_DIR"] = CACHE

import numba  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def load(path, j):
    name = f"fastlvm.kernels._ab_version_{j}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def kmeans_replay(args):
    """One bench fit's passes, and a function that replays them through a kmeans.py version."""
    from bench_kmeans import CASES, make_data

    import fastlvm.kernels.kmeans as current
    from fastlvm import KMeans

    c = next(c for c in CASES if c.name == args.case)
    X, init = make_data(c)
    calls = []
    assign = current.LloydState.assign

    def record(self, C, moves, distances=False):
        calls.append((np.array(C), np.array(moves), distances))
        return assign(self, C, moves, distances)

    current.LloydState.assign = record
    try:
        KMeans(c.k, init=init, n_init=1, max_iter=c.iters, tol=0.0).fit(X)
    finally:
        current.LloydState.assign = assign
    weights = np.ones(X.shape[0])

    def replay(module):
        state = module.LloydState(module.Rows(X), weights, c.k)
        t = time.perf_counter()
        for C, moves, distances in calls:
            state.assign(C, moves, distances)
        return (time.perf_counter() - t) / len(calls)

    return replay, f"{c.name}: {len(calls)} passes of one fit"


def gmm_replay(args):
    """The last statistics pass of a 2-iteration bench fit, and its replay through a cpu.py version."""
    from bench_gmm import initial_parameters, make_data

    import fastlvm.kernels.cpu as current
    from fastlvm.mixture import GaussianMixture

    N, D, K = 200_000, 32, 16
    X = make_data(N, D, K, np.dtype(args.dtype))
    init = initial_parameters(X, K, args.cov)
    calls = []
    suff_stats = current.suff_stats

    def record(*a, **k):
        calls.append((a, k))
        return suff_stats(*a, **k)

    current.suff_stats = record
    try:
        GaussianMixture(K, covariance_type=args.cov, max_iter=2, tol=0, weights_init=init["weights"],
                        means_init=init["means"], precisions_init=init["precisions"]).fit(X)
    finally:
        current.suff_stats = suff_stats
    a, k = calls[-1]
    a = a[:8] + (args.threads,) + a[9:]  # n_workers

    def replay(module):
        t = time.perf_counter()
        module.suff_stats(*a, **k)
        return time.perf_counter() - t

    return replay, f"{args.cov} {args.dtype} N={N} D={D} K={K}: one statistics pass"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["kmeans", "gmm"])
    ap.add_argument("versions", nargs="+", help="paths of versions of the kernel module; the first is the baseline")
    ap.add_argument("--case", default="dense-f32", help="kmeans: a bench_kmeans.py case name")
    ap.add_argument("--cov", default="diag", help="gmm: covariance type")
    ap.add_argument("--dtype", default="float32", help="gmm: float32 or float64")
    ap.add_argument("--threads", type=int, default=numba.get_num_threads())
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    numba.set_num_threads(args.threads)
    replay, what = (kmeans_replay if args.kind == "kmeans" else gmm_replay)(args)
    modules = [load(p, j) for j, p in enumerate(args.versions)]
    for m in modules:  # compiles
        replay(m)
    times = np.array([[replay(m) for m in modules] for _ in range(args.rounds)]) * 1e3
    print(f"{what}, {args.threads} thread(s), {args.rounds} rounds")
    for j, path in enumerate(args.versions):
        t = times[:, j]
        line = f"  {path}: min {t.min():.3f} ms, median {np.median(t):.3f} ms"
        if j:
            line += (f"; median ratio to the first {np.median(t / times[:, 0]):.3f}, faster than it in "
                     f"{np.mean(t < times[:, 0]):.0%} of rounds")
        print(line)


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(CACHE, ignore_errors=True)
