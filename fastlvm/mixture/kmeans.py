"""K-means: hard EM with equal weights and unit isotropic variance, on the mixture kernel."""

import numbers
import time

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from fastlvm._validation import check_finite, check_scalar
from fastlvm.kernels import cpu
from fastlvm.mixture.covariance import COVARIANCE_TYPES
from fastlvm.mixture.init import isotropic_parameters, kmeans_plusplus, random_rows, squared_distances
from fastlvm.mixture.stats import default_chunk_rows, scores, statistics

_SPHERICAL = COVARIANCE_TYPES["spherical"]


class KMeans(ClusterMixin, TransformerMixin, BaseEstimator):
    """K-means clustering by Lloyd iterations on fastlvm's fused mixture kernel.

    Each iteration is one pass: every row is assigned to its nearest centre and the per-cluster
    row counts, centred sums and squared distances are accumulated; centres move to the means.
    Iterations match scikit-learn's Lloyd algorithm from the same initial centres, and stop when
    the total squared centre shift is at most tol * mean feature variance. An empty cluster is
    moved onto the row farthest from its centre.
    """

    def __init__(self, n_clusters=8, *, init="k-means++", n_init=1, max_iter=300, tol=1e-4,
                 random_state=None, verbose=0):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self, X):
        check_scalar(self.n_clusters, "n_clusters", kind=numbers.Integral, low=1)
        check_scalar(self.n_init, "n_init", kind=numbers.Integral, low=1)
        check_scalar(self.max_iter, "max_iter", kind=numbers.Integral, low=1)
        check_scalar(self.tol, "tol", low=0)
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"n_samples={X.shape[0]} should be >= n_clusters={self.n_clusters}.")
        if isinstance(self.init, str):
            if self.init not in ("k-means++", "random"):
                raise ValueError(f"init must be 'k-means++', 'random' or an array of shape "
                                 f"(n_clusters, n_features), got {self.init!r}")
        else:
            init = np.asarray(self.init, dtype=np.float64)
            if init.shape != (self.n_clusters, X.shape[1]):
                raise ValueError(f"init array must have shape ({self.n_clusters}, {X.shape[1]}), got {init.shape}")
            if not np.all(np.isfinite(init)):
                raise ValueError("init array contains NaN or infinity")

    def _initial_centres(self, X, rng, chunk_rows):
        if isinstance(self.init, str):
            if self.init == "k-means++":
                return kmeans_plusplus(X, self.n_clusters, rng, chunk_rows)
            return random_rows(X, self.n_clusters, rng)
        return np.array(self.init, dtype=np.float64)

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_all_finite=False, order="C")
        check_finite(X)
        self._check_params(X)
        rng = check_random_state(self.random_state)
        rng = np.random.default_rng(rng.randint(2**31))
        K, D = self.n_clusters, X.shape[1]
        chunk_rows = default_chunk_rows(K, 1, cpu.BLOCK_ROWS)
        # Data moments from the same kernel with one component, shifted by a row against cancellation.
        shift = np.asarray(X[:1], dtype=np.float64)
        moments = statistics(X, _SPHERICAL, isotropic_parameters(shift, X.dtype), chunk_rows, hard=True)
        mean_var = (moments.second[0, 0, 0] / X.shape[0] - (moments.s[0] ** 2).sum() / X.shape[0] ** 2) / D
        tol = mean_var * self.tol
        best = None
        for _ in range(self.n_init):
            centres = self._initial_centres(X, rng, chunk_rows)
            result = self._lloyd(X, centres, tol, chunk_rows)
            if best is None or result[1] < best[1]:
                best = result
        centres, inertia, labels, n_iter = best
        self.cluster_centers_ = centres.astype(X.dtype)
        self.labels_ = labels
        self.inertia_ = float(inertia)
        self.n_iter_ = n_iter
        return self

    def _lloyd(self, X, centres, tol, chunk_rows):
        K = self.n_clusters
        n_iter = 0
        for n_iter in range(1, self.max_iter + 1):
            t0 = time.perf_counter()
            kp = isotropic_parameters(centres, X.dtype)
            st = statistics(X, _SPHERICAL, kp, chunk_rows, hard=True, n_worst=K)
            new = st.shift + st.s / np.maximum(st.n, 1.0)[:, None]
            empty = np.flatnonzero(st.n == 0)
            for k, (_, row) in zip(empty, st.worst):
                new[k] = X[row]  # farthest rows first
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if self.verbose:
                print(f"KMeans iteration {n_iter}: inertia {-2.0 * st.loglik:.6g}, "
                      f"centre shift {shift:.3g}, {time.perf_counter() - t0:.3f} s")
            if shift <= tol:
                break
        ll, labels, _ = scores(X, _SPHERICAL, isotropic_parameters(centres, X.dtype), chunk_rows, hard=True)
        inertia = -2.0 * ll.sum()
        return centres, inertia, labels, n_iter

    def _distances(self, X):
        check_is_fitted(self, "cluster_centers_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_all_finite=False, order="C", reset=False)
        check_finite(X)
        return X

    def predict(self, X):
        X = self._distances(X)
        _, labels, _ = scores(X, _SPHERICAL, isotropic_parameters(self.cluster_centers_.astype(np.float64), X.dtype),
                              default_chunk_rows(self.n_clusters, 1, cpu.BLOCK_ROWS), hard=True)
        return labels

    def fit_predict(self, X, y=None):
        return self.fit(X).labels_

    def transform(self, X):
        X = self._distances(X)
        d2 = squared_distances(X, self.cluster_centers_.astype(np.float64),
                               default_chunk_rows(self.n_clusters, 1, cpu.BLOCK_ROWS))
        return np.sqrt(d2).astype(X.dtype)

    def score(self, X, y=None):
        """Opposite of the sum of squared distances of X to its nearest centre."""
        X = self._distances(X)
        ll, _, _ = scores(X, _SPHERICAL, isotropic_parameters(self.cluster_centers_.astype(np.float64), X.dtype),
                          default_chunk_rows(self.n_clusters, 1, cpu.BLOCK_ROWS), hard=True)
        return float(2.0 * ll.sum())
