"""Checks of the user's initial parameters (weights_init, means_init, precisions_init), with
scikit-learn's wording: libraries and tests match on it."""

from typing import NamedTuple

import numpy as np
from sklearn.utils import check_array


class InitialArrays(NamedTuple):
    """The user's initial parameters as float64 arrays (None where not given); precisions as the
    upper-triangular Cholesky factors the kernels read."""

    weights: object
    means: object
    precisions_cholesky: object


def _check_shape(param, shape, name):
    if param.shape != shape:
        raise ValueError(f"The parameter '{name}' should have the shape of {shape}, but got {param.shape}")


def check_weights(weights, K):
    weights = check_array(weights, dtype=[np.float64, np.float32], ensure_2d=False)
    _check_shape(weights, (K,), "weights")
    if np.any(weights < 0.0) or np.any(weights > 1.0):
        # (scikit-learn's message names the minimum "max" and the maximum "min"; kept for matching)
        raise ValueError("The parameter 'weights' should be in the range [0, 1], but got "
                         f"max value {np.min(weights):.5f}, min value {np.max(weights):.5f}")
    atol = 1e-6 if weights.dtype == np.float32 else 1e-8
    if not np.allclose(abs(1.0 - float(np.sum(weights))), 0.0, atol=atol):
        raise ValueError(f"The parameter 'weights' should be normalized, but got sum(weights) = {np.sum(weights):.5f}")
    return weights.astype(np.float64)


def check_means(means, K, D):
    means = check_array(means, dtype=[np.float64, np.float32], ensure_2d=False)
    _check_shape(means, (K, D), "means")
    return means.astype(np.float64)


def check_precisions(precisions, cov, K, D):
    """The precisions, checked as scikit-learn does: the shape of the covariance type, then positive
    entries (diag, spherical) or symmetric positive definite matrices (full, tied)."""
    name = f"{cov.name} precision"
    precisions = check_array(precisions, dtype=[np.float64, np.float32], ensure_2d=False,
                             allow_nd=len(cov.shape(K, D)) > 2)
    _check_shape(precisions, cov.shape(K, D), name)
    precisions = precisions.astype(np.float64)
    cov.check_precisions(precisions, name)
    return precisions


def check_initial_arrays(weights_init, means_init, precisions_init, cov, K, D):
    """InitialArrays from the estimator's weights_init, means_init and precisions_init."""
    return InitialArrays(
        None if weights_init is None else check_weights(weights_init, K),
        None if means_init is None else check_means(means_init, K, D),
        None if precisions_init is None else cov.cholesky_of_precisions(check_precisions(precisions_init, cov, K, D)),
    )
