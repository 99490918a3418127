"""Initial centres: k-means++ seeding and random rows. Distances come from the mixture kernel
with unit isotropic components (log p(x, k) = -||x - c_k||^2 / 2)."""

import numpy as np

from fastlvm.mixture.covariance import COVARIANCE_TYPES
from fastlvm.mixture.stats import kernel_parameters, scores

_SPHERICAL = COVARIANCE_TYPES["spherical"]


def isotropic_parameters(centres, dtype):
    """Kernel parameters under which log p(x, k) = -||x - c_k||^2 / 2 (equal weights, unit variance)."""
    K, D = centres.shape
    kp = kernel_parameters(_SPHERICAL, np.full(K, 1.0 / K), centres, np.ones(K), dtype)
    return kp[0], kp[1], np.zeros(K), kp[3]


def squared_distances(X, centres, chunk_rows):
    """(N, K) squared distances of every row to each centre (K small)."""
    kp = isotropic_parameters(np.asarray(centres, dtype=np.float64), X.dtype)
    _, _, logp = scores(X, _SPHERICAL, kp, chunk_rows, want_log_prob=True)
    return np.maximum(-2.0 * logp, 0.0)


def kmeans_plusplus(X, n_clusters, rng, chunk_rows):
    """Greedy k-means++ (Arthur & Vassilvitskii, 2007): each new centre is the best of
    2 + log(K) candidates drawn with probability proportional to squared distance."""
    N, D = X.shape
    n_trials = 2 + int(np.log(n_clusters))
    centres = np.empty((n_clusters, D))
    centres[0] = X[rng.integers(N)]
    closest = squared_distances(X, centres[:1], chunk_rows)[:, 0]
    for c in range(1, n_clusters):
        cumulative = np.cumsum(closest)
        if cumulative[-1] <= 0:  # every row sits on a centre: any row will do
            candidates = rng.integers(N, size=n_trials)
        else:
            candidates = np.searchsorted(cumulative, rng.uniform(size=n_trials) * cumulative[-1], side="right")
            candidates = np.minimum(candidates, N - 1)
        dist = np.minimum(closest[:, None], squared_distances(X, X[candidates], chunk_rows))
        best = int(np.argmin(dist.sum(axis=0)))
        centres[c] = X[candidates[best]]
        closest = dist[:, best]
    return centres


def random_rows(X, n_clusters, rng):
    return np.asarray(X[np.sort(rng.choice(X.shape[0], n_clusters, replace=False))], dtype=np.float64)
