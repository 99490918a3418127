"""The M-step: parameters from sufficient statistics, shared by every backend."""

import numpy as np

# scikit-learn adds this to every n_k so an empty component divides by a tiny number, not zero.
_NK_FLOOR = 10 * np.finfo(np.float64).eps
# A component with less than this effective row count is treated as collapsed and re-seeded.
COLLAPSE_WEIGHT = 1e-3


def m_step(stats, cov_type, reg_covar, prior=None):
    """(weights, means, covariances, collapsed) maximising the expected complete-data
    log-likelihood (or log-posterior with a ResolvedPrior). `collapsed` lists components
    with too little weight to estimate; their entries are finite placeholders."""
    n = stats.n + _NK_FLOOR
    K, D = stats.s.shape
    delta = stats.s / n[:, None]
    xbar = stats.shift + delta
    scatter = cov_type.scatter(stats.second, n, delta)
    if prior is None:
        weights = n / n.sum()
        means = xbar
        d = None
    else:
        a = prior.weight_concentration
        weights = (n + a - 1) / (n.sum() + K * (a - 1))
        kappa = prior.mean_precision
        means = (kappa * prior.mean + n[:, None] * xbar) / (kappa + n)[:, None]
        d = xbar - prior.mean
    weights = weights / weights.sum()
    covariances = cov_type.m_step(scatter, n, d, reg_covar, prior, D)
    collapsed = list(np.flatnonzero(stats.n < COLLAPSE_WEIGHT))
    return weights, means, covariances, collapsed
