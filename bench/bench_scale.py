"""GMM at scale: out-of-core EM on a float32 memmap, and a 2-worker Dask LocalCluster beside the
single-process fit on the same data.

1. An N x 32 float32 .npy file (default N = 10,000,000: 1.2 GiB) drawn from a 16-component
   mixture is written chunk by chunk to a temporary directory (--dir).
2. Memmap fits, one subprocess per covariance type (full, diag), K = 16, tol = 0:
   a warm-up fit on small data (Numba compilation excluded), then the memmap is opened and the
   RSS read (baseline), then the fit runs (initialisation on a 100,000-row sample, M passes)
   while a thread samples the process's memory every 5 ms. Reported:
     rows/s         N / (seconds of one EM pass), the median over passes (the fit's own
                    per-pass progress lines, verbose=1)
     peak working   peak anonymous RSS - baseline: memory the OS cannot drop, i.e. beyond what
                    it caches (the contract: <= 128 MB)
     peak RSS       peak RSS - baseline, which also counts the memmap's page-cache pages mapped
                    into the process (they are the OS cache, reclaimable, shared)
3. Dask: one subprocess starts a LocalCluster of 2 worker processes x 1 thread; each block
   (--block-rows) is read from the .npy file by its task. The same M passes from the same
   initial parameters run in that process on the memmap (Numba's threads on both cores) and on
   the cluster (one Numba thread per worker, so both use two cores); reported: the ratio of
   per-pass times (speed-up of the cluster) and the relative difference of the final lower
   bounds (they should agree to rounding).

Ratios, not claims: only the cluster that was run (2 local workers on this machine) is measured.

    python bench/bench_scale.py [--rows N] [--iters M] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_gmm import _rss_bytes  # noqa: E402  (/proc/self/status fields in bytes)

D, K = 32, 16
PREFIX = "@@bench-scale "


# ------------------------------------------------------------------------------- data
def write_data(path, n, seed=0, chunk=500_000):
    """An (n, D) float32 .npy file of a K-component mixture, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, D)).astype(np.float32) * 4
    scales = rng.uniform(0.5, 1.5, size=(K, D)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        labels = rng.integers(K, size=b - a)
        out[a:b] = centres[labels] + scales[labels] * rng.standard_normal((b - a, D), dtype=np.float32)
    out.flush()
    del out


def _load_block(path, start, stop):
    """One block of the .npy file, read inside a Dask task (nothing but the path is shipped)."""
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def dask_array(path, block_rows):
    import dask
    import dask.array as da

    n = np.load(path, mmap_mode="r").shape[0]
    blocks = [da.from_delayed(dask.delayed(_load_block)(path, a, min(n, a + block_rows)),
                              shape=(min(n, a + block_rows) - a, D), dtype=np.float32)
              for a in range(0, n, block_rows)]
    return da.concatenate(blocks)


# ------------------------------------------------------------------------------- memory
class Peaks:
    """Peak RSS and peak anonymous RSS while the block runs (both sampled every 5 ms)."""

    def __enter__(self):
        self.rss, self.anon, self._stop = [_rss_bytes("VmRSS")], [_rss_bytes("RssAnon")], threading.Event()

        def sample():
            while not self._stop.is_set():
                self.rss.append(_rss_bytes("VmRSS"))
                self.anon.append(_rss_bytes("RssAnon"))
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss, self.peak_anon = max(self.rss), max(self.anon)
        return False


# ------------------------------------------------------------------------------- workers
_PASS = re.compile(r"Iteration \d+: .*?, ([0-9.]+) s, [0-9,]+ rows/s")


def _timed_fit(est, X):
    """Fit with per-pass progress captured; returns the per-pass seconds."""
    import contextlib
    import io
    import warnings

    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    return [float(m.group(1)) for m in _PASS.finditer(err.getvalue())]


def _send(obj):
    print(PREFIX + json.dumps(obj), flush=True)


def memmap_worker(path, cov, iters):
    import gc

    from fastlvm import GaussianMixture

    small = np.ascontiguousarray(np.load(path, mmap_mode="r")[:20_000])
    GaussianMixture(K, covariance_type=cov, max_iter=2, tol=0, random_state=0).fit(small)  # compile
    del small
    X = np.load(path, mmap_mode="r")
    gc.collect()
    est = GaussianMixture(K, covariance_type=cov, max_iter=iters, tol=0, random_state=0, verbose=1,
                          verbose_interval=1)
    t0 = time.perf_counter()
    with Peaks() as peaks:
        passes = _timed_fit(est, X)
    total = time.perf_counter() - t0
    baseline_rss, baseline_anon = peaks.rss[0], peaks.anon[0]
    _send({"cov": cov, "n": X.shape[0], "passes": passes, "fit_s": total,
           "rows_per_s": X.shape[0] / statistics.median(passes),
           "peak_working_mb": (peaks.peak_anon - baseline_anon) / 2**20,
           "peak_rss_mb": (peaks.peak_rss - baseline_rss) / 2**20,
           "file_mb": os.path.getsize(path) / 2**20})


def dask_worker(path, cov, iters, block_rows):
    import logging

    import cloudpickle
    import distributed

    from fastlvm import GaussianMixture

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import bench/
    X = np.load(path, mmap_mode="r")
    start = GaussianMixture(K, covariance_type=cov, max_iter=1, tol=0, random_state=0, init_size=50_000)
    _timed_fit(start, np.ascontiguousarray(X[:200_000]))
    init = dict(weights_init=start.weights_.astype(np.float64), means_init=start.means_.astype(np.float64),
                precisions_init=start.precisions_.astype(np.float64))
    kw = dict(covariance_type=cov, max_iter=iters, tol=0, verbose=1, verbose_interval=1, **init)
    single = GaussianMixture(K, **kw)
    single_passes = _timed_fit(single, X)
    # One Numba thread per worker: 2 workers x 1 thread use the same 2 cores as the single process.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR, env={"NUMBA_NUM_THREADS": "1"}) as cluster, \
            distributed.Client(cluster) as client:
        Xd = dask_array(path, block_rows)
        client.run(lambda: GaussianMixture(2, max_iter=1).fit(np.random.default_rng(0).normal(size=(500, D))))
        cluster_fit = GaussianMixture(K, **kw)
        cluster_passes = _timed_fit(cluster_fit, Xd)
    agree = abs(cluster_fit.lower_bound_ - single.lower_bound_) / abs(single.lower_bound_)
    _send({"cov": cov, "n": X.shape[0], "single_passes": single_passes, "cluster_passes": cluster_passes,
           "speedup": statistics.median(single_passes) / statistics.median(cluster_passes),
           "lower_bound_rel_diff": agree, "blocks": int(Xd.numblocks[0])})


def _run_worker(args, timeout):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:200]}", **args}


# ------------------------------------------------------------------------------- report
def report(memmap, cluster, n, iters, load):
    lines = [f"GMM at scale: N = {n:,} x {D} float32 (.npy memmap, {n * D * 4 / 2**30:.2f} GiB), K = {K}, "
             f"{iters} EM passes, init on a 100,000-row sample; load average {load[0]:.1f} -> {load[1]:.1f} "
             f"on {os.cpu_count()} cores",
             f"{'covariance':<11}{'rows/s':>14}{'fit (s)':>10}{'peak working':>15}{'peak RSS':>11}",
             f"{'':<11}{'(per pass)':>14}{'':>10}{'(MB, anon)':>15}{'(MB)':>11}"]
    for r in memmap:
        if "error" in r:
            lines.append(f"{r['cov']:<11}  failed: {r['error']}")
            continue
        lines.append(f"{r['cov']:<11}{r['rows_per_s']:>14,.0f}{r['fit_s']:>10.1f}{r['peak_working_mb']:>15.1f}"
                     f"{r['peak_rss_mb']:>11.0f}")
    lines.append("  peak working = peak anonymous RSS growth (what the OS cannot drop; target <= 128 MB);")
    lines.append("  peak RSS also counts the memmap's page-cache pages mapped into the process.")
    for r in cluster:
        if "error" in r:
            lines.append(f"Dask LocalCluster ({r['cov']}): failed: {r['error']}")
            continue
        lines.append(f"Dask LocalCluster, 2 workers x 1 thread, {r['blocks']} blocks ({r['cov']}): per-pass time "
                     f"{statistics.median(r['cluster_passes']):.2f} s vs {statistics.median(r['single_passes']):.2f} s "
                     f"single process (2 Numba threads): speed-up x{r['speedup']:.2f}; "
                     f"lower bounds agree to {r['lower_bound_rel_diff']:.1e} (relative)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Out-of-core and Dask GMM benchmark (rows/s, peak memory, ratios).")
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the memmap (default 10,000,000)")
    ap.add_argument("--iters", type=int, default=3, help="EM passes per fit (default 3)")
    ap.add_argument("--covs", default="full,diag", help="covariance types of the memmap fits")
    ap.add_argument("--dask-cov", default="full", help="covariance type of the Dask comparison ('' to skip)")
    ap.add_argument("--block-rows", type=int, default=250_000, help="rows per Dask block")
    ap.add_argument("--quick", action="store_true", help="1,000,000 rows, 2 passes: a smoke run")
    ap.add_argument("--dir", help="directory for the data file (default: a temporary directory)")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one worker may take")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec["kind"] == "memmap":
            memmap_worker(spec["path"], spec["cov"], spec["iters"])
        else:
            dask_worker(spec["path"], spec["cov"], spec["iters"], spec["block_rows"])
        return None
    n, iters = (1_000_000, 2) if args.quick else (args.rows, args.iters)
    load = [os.getloadavg()[0]]
    tmp = tempfile.mkdtemp(prefix="fastlvm-bench-scale-", dir=args.dir)
    try:
        path = os.path.join(tmp, "x.npy")
        t0 = time.perf_counter()
        write_data(path, n)
        print(f"wrote {n:,} x {D} float32 in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        memmap = [_run_worker({"kind": "memmap", "path": path, "cov": cov, "iters": iters}, args.timeout)
                  for cov in args.covs.split(",") if cov]
        cluster = []
        if args.dask_cov:
            cluster.append(_run_worker({"kind": "dask", "path": path, "cov": args.dask_cov, "iters": iters,
                                        "block_rows": args.block_rows}, args.timeout))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load.append(os.getloadavg()[0])
    text = report(memmap, cluster, n, iters, load)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memmap": memmap, "dask": cluster, "rows": n, "iters": iters, "load": load}, f, indent=1)
    return text


if __name__ == "__main__":
    main()
