"""Online (stepwise) EM: partial_fit's first step is one EM step from the same initialisation, and
a few passes of shuffled batches reach the batch EM optimum (scikit-learn's) within 1%."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from fastlvm import GaussianMixture
from fastlvm.mixture.online import step_size

COV_TYPES = ["full", "tied", "diag", "spherical"]
FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def correlated_mixture(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 4)) * 2
    mixing = rng.normal(size=(3, 4, 4)) * 0.5 + np.eye(4)
    labels = rng.integers(3, size=n)
    return centres[labels] + np.einsum("nij,nj->ni", mixing[labels], rng.normal(size=(n, 4)))


@pytest.mark.parametrize("cov_type", ["full", "tied"])
def test_first_batch_step_is_one_em_step_from_the_same_start(cov_type):
    X = correlated_mixture(3_000, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        batch = GaussianMixture(3, covariance_type=cov_type, max_iter=1, random_state=0).fit(X)
    online = GaussianMixture(3, covariance_type=cov_type, random_state=0).partial_fit(X)
    for name in FITTED:
        np.testing.assert_allclose(getattr(online, name), getattr(batch, name), rtol=1e-10, err_msg=name)
    assert online.lower_bound_ == pytest.approx(batch.lower_bound_, rel=1e-12)
    assert online.n_iter_ == 1 and online.n_features_in_ == 4


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_shuffled_passes_reach_the_batch_optimum(cov_type):
    X = correlated_mixture(12_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        optimum = SkGaussianMixture(3, covariance_type=cov_type, n_init=3, tol=1e-6, max_iter=500,
                                    random_state=0).fit(X).score(X)
    rng = np.random.default_rng(0)
    online = GaussianMixture(3, covariance_type=cov_type, random_state=0)
    scores = []
    for _ in range(3):
        order = rng.permutation(X.shape[0])
        for start in range(0, X.shape[0], 1_000):
            online.partial_fit(X[order[start : start + 1_000]])
        scores.append(online.score(X))
    assert online.n_iter_ == 36
    assert abs(scores[-1] - optimum) <= 0.01 * abs(optimum), (scores, optimum)


def test_step_sizes_decay_as_documented():
    est = GaussianMixture(2)
    rho = [step_size(t, est.learning_offset, est.learning_decay) for t in range(2, 200)]
    assert rho[0] == pytest.approx((1 + est.learning_offset) ** -est.learning_decay)
    assert np.all(np.diff(rho) < 0) and 0 < rho[-1] < rho[0] < 1
    assert sum(rho) > 5 * sum(r * r for r in rho)  # steps shrink slowly: the sum grows without bound


def test_partial_fit_bad_input():
    X = correlated_mixture(500)
    est = GaussianMixture(2, random_state=0).partial_fit(X)
    with pytest.raises(ValueError, match="X has 3 features, but GaussianMixture is expecting 4"):
        est.partial_fit(X[:, :3])
    est.partial_fit(X[:1])  # later batches may be smaller than n_components
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        GaussianMixture(5).partial_fit(X[:3])
    with pytest.raises(ValueError, match="prior"):
        GaussianMixture(2, prior={}).partial_fit(X)
    with pytest.raises(ValueError, match="learning_decay"):
        GaussianMixture(2, learning_decay=0.5).partial_fit(X)
    with pytest.raises(ValueError, match="learning_offset"):
        GaussianMixture(2, learning_offset=-1.0).partial_fit(X)
