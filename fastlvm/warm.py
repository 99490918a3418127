"""Compiles and caches the Numba kernels once, so that no later fit pays for compilation:
a tiny fit (and the per-row methods) of every covariance type in float32 and float64, and of
KMeans (dense and CSR) through the public estimators, so every kernel they reach is warmed, the
k-means bounded passes, nearest-centre search and cluster sums, and the thread pool's wait.

    python -m fastlvm.warm

Numba keeps the compiled code in NUMBA_CACHE_DIR (by default __pycache__ beside the package);
on a cluster, run this once per CPU type with NUMBA_CACHE_DIR on a shared file system.
"""

import time
import warnings

import numpy as np
import scipy.sparse as sp

from fastlvm.kernels import kmeans as kmeans_kernels
from fastlvm.kernels import workers
from fastlvm.kernels.kmeans import LloydState, Rows, cluster_sums, nearest_centres
from fastlvm.mixture import GaussianMixture, KMeans

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def warm(verbose=True):
    X = np.random.default_rng(0).normal(size=(300, 3))
    for dtype in (np.float32, np.float64):
        Xd = X.astype(dtype)
        for cov in COVARIANCE_TYPES:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = GaussianMixture(2, covariance_type=cov, max_iter=2, random_state=0).fit(Xd)
            gm.predict_proba(Xd)
            gm.score_samples(Xd)
            if verbose:
                print(f"fastlvm.warm: GaussianMixture {cov} {np.dtype(dtype).name}: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        # separated clusters, dense and CSR; the bounded passes, allowed on so few rows: labels
        # that stop changing get bounds at the third pass, used at the fourth; the codebook search
        blobs = (X + np.repeat(np.eye(3) * 20, 100, axis=0)).astype(dtype)
        KMeans(3, n_init=1, random_state=0).fit(blobs).predict(blobs)
        KMeans(3, n_init=1, random_state=0).fit(sp.csr_matrix(blobs))
        min_rows, kmeans_kernels.BOUNDED_MIN_ROWS = kmeans_kernels.BOUNDED_MIN_ROWS, 0
        try:
            for rows in (Rows(blobs), Rows(sp.csr_matrix(blobs))):
                state = LloydState(rows, np.ones(len(blobs)), 3)
                for _ in range(4):
                    state.assign(blobs[::100], np.zeros(3))
        finally:
            kmeans_kernels.BOUNDED_MIN_ROWS = min_rows
        nearest_centres(blobs, blobs[:3].copy())
        cluster_sums(blobs, np.zeros(len(blobs), dtype=np.int64), 3)
        if verbose:
            print(f"fastlvm.warm: KMeans {np.dtype(dtype).name}: {time.perf_counter() - t0:.1f} s")
    flag = np.zeros(1, dtype=np.int64)  # the pool's wait, which tiny fits (one thread) never reach
    workers._spin_until(flag, 0, 0, flag, False)


if __name__ == "__main__":
    warm()
