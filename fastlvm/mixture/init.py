"""Initial centres: k-means++ seeding and random rows, optionally weighted by sample weights.
Distances come from the k-means kernels (dense or CSR rows)."""

import numpy as np

from fastlvm.engine import Rows


def kmeans_plusplus(X, n_clusters, rng, chunk_rows=None, sample_weight=None):
    """Greedy k-means++ (Arthur & Vassilvitskii, 2007): each new centre is the best of
    2 + log(K) candidates drawn with probability proportional to weight x squared distance
    (the draws are scikit-learn's, in its order). X: a dense array, CSR matrix or Rows;
    rng: a numpy RandomState or Generator. Returns float64 centres (K, D)."""
    rows = X if isinstance(X, Rows) else Rows(_c_array(X))
    N = rows.n_rows
    w = np.ones(N) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    n_trials = 2 + int(np.log(n_clusters))
    first = rng.choice(N, p=w / w.sum())
    centres = np.empty((n_clusters, rows.n_features))
    centres[0] = rows.rows([first])[0]
    closest = rows.sq_distances(centres[:1])[:, 0]
    potential = closest @ w
    for c in range(1, n_clusters):
        draws = rng.uniform(size=n_trials) * potential
        cumulative = w * closest
        candidates = np.minimum(np.searchsorted(np.cumsum(cumulative, out=cumulative), draws), N - 1)
        candidate_rows = rows.rows(candidates)
        dist = rows.sq_distances(candidate_rows)
        np.minimum(dist, closest[:, None], out=dist)
        potentials = w @ dist
        best = int(np.argmin(potentials))
        potential = potentials[best]
        closest = dist[:, best].copy()  # not a view: the candidates' distances can go
        centres[c] = candidate_rows[best]
    return centres


def random_rows(X, n_clusters, rng, sample_weight=None):
    """n_clusters distinct rows drawn uniformly (sorted), or with probability proportional to
    sample_weight (in the order drawn, as scikit-learn draws them)."""
    if sample_weight is None:
        index = np.sort(rng.choice(X.shape[0], n_clusters, replace=False))
    else:
        w = np.asarray(sample_weight, dtype=np.float64)
        index = rng.choice(X.shape[0], size=n_clusters, replace=False, p=w / w.sum())
    if isinstance(X, Rows):
        return X.rows(index)
    rows = X[index]
    return np.asarray(rows.toarray() if hasattr(rows, "toarray") else rows, dtype=np.float64)


def _c_array(X):
    if hasattr(X, "indptr"):
        return X
    X = np.ascontiguousarray(X)
    return X if X.dtype in (np.float32, np.float64) else X.astype(np.float64)
