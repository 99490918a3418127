"""GaussianMixture against scikit-learn's (the oracle) from identical initial parameters,
scikit-learn's estimator checks, and the estimator-level behaviours of the issue."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.utils.estimator_checks import check_estimator

from fastlvm import GaussianMixture, GaussianMixturePrior

COV_TYPES = ["full", "tied", "diag", "spherical"]


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def sklearn_start(X, K, cov_type, seed=0):
    """Initial parameters from a short scikit-learn fit, as init arrays for both libraries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGaussianMixture(K, covariance_type=cov_type, max_iter=2, random_state=seed).fit(X)
    return dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)


def both(X, K, cov_type, n_iter, **kw):
    init = sklearn_start(X, K, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGaussianMixture(K, covariance_type=cov_type, max_iter=n_iter, tol=0, **init, **kw).fit(X)
        ours = GaussianMixture(K, covariance_type=cov_type, max_iter=n_iter, tol=0, **init, **kw).fit(X)
    return sk, ours


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("loader", [load_iris, load_wine], ids=["iris", "wine"])
@pytest.mark.parametrize("n_iter", [1, 25])
def test_matches_sklearn_float64(loader, cov_type, n_iter):
    X = loader().data
    sk, ours = both(X, 3, cov_type, n_iter)
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        assert rel(getattr(ours, name), getattr(sk, name)) < 1e-8, name
    assert ours.lower_bound_ == pytest.approx(sk.lower_bound_, rel=1e-10)
    assert ours.n_iter_ == sk.n_iter_
    # Inference with the fitted parameters.
    assert rel(ours.score_samples(X), sk.score_samples(X)) < 1e-10
    assert rel(ours.predict_proba(X), sk.predict_proba(X)) < 1e-8
    np.testing.assert_array_equal(ours.predict(X), sk.predict(X))
    assert ours.bic(X) == pytest.approx(sk.bic(X), rel=1e-10)
    assert ours.aic(X) == pytest.approx(sk.aic(X), rel=1e-10)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_float32_keeps_float32_and_agrees(cov_type):
    X = load_wine().data
    X = (X - X.mean(0)) / X.std(0)
    sk, _ = both(X, 3, cov_type, 10)
    init = sklearn_start(X, 3, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GaussianMixture(3, covariance_type=cov_type, max_iter=10, tol=0, **init).fit(X.astype(np.float32))
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert getattr(ours, name).dtype == np.float32
        assert rel(getattr(ours, name), getattr(sk, name)) < 1e-3, name
    assert ours.score_samples(X.astype(np.float32)).shape == (X.shape[0],)


def test_sklearn_check_estimator():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(GaussianMixture(), on_fail=None)
    failed = [(r["check_name"], r["exception"]) for r in results if r["status"] == "failed"]
    assert not failed


def blobs(n=600, d=3, k=3, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * scale
    labels = rng.integers(k, size=n)
    return centres[labels] + rng.normal(size=(n, d)), centres


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_every_initialisation_finds_separated_clusters(init_params, cov_type):
    X, centres = blobs(scale=8.0)
    gm = GaussianMixture(3, covariance_type=cov_type, init_params=init_params, n_init=3, random_state=0,
                         max_iter=200).fit(X)
    assert gm.converged_
    if init_params != "random":
        # Each true centre has a fitted mean close to it (sampling error of 200 rows is ~0.12).
        # ('random' starts every mean at the data mean and, like scikit-learn's, can stop there.)
        dist = np.linalg.norm(gm.means_[:, None, :] - centres[None], axis=2)
        assert dist.min(axis=0).max() < 0.4
    assert np.all(np.diff(gm.lower_bounds_) > -1e-9)
    sk = SkGaussianMixture(3, covariance_type=cov_type, init_params=init_params, n_init=3, random_state=0,
                           max_iter=200).fit(X)
    assert gm.lower_bound_ >= sk.lower_bound_ - 1e-3


def test_random_state_reproducible_and_n_init_keeps_best():
    X, _ = blobs(k=4, seed=3, scale=2.0)
    a = GaussianMixture(4, random_state=7, init_params="random").fit(X)
    b = GaussianMixture(4, random_state=7, init_params="random").fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    singles = [GaussianMixture(4, random_state=s, init_params="random", max_iter=500).fit(X).lower_bound_
               for s in range(4)]
    best = GaussianMixture(4, random_state=0, init_params="random", n_init=4, max_iter=500).fit(X)
    assert best.lower_bound_ >= max(singles) - 1e-3 or best.lower_bound_ >= np.median(singles)


def test_warm_start_continues_from_previous_parameters():
    X, _ = blobs(seed=2)
    init = dict(random_state=0, init_params="random_from_data", tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full = GaussianMixture(3, max_iter=10, **init).fit(X)
        warm = GaussianMixture(3, max_iter=4, warm_start=True, **init).fit(X)
        warm.set_params(max_iter=6)
        warm.fit(X)
    assert rel(warm.means_, full.means_) < 1e-10
    assert rel(warm.covariances_, full.covariances_) < 1e-10


def test_fit_predict_equals_predict_after_fit():
    X, _ = blobs(seed=4)
    gm = GaussianMixture(3, random_state=0)
    labels = gm.fit_predict(X)
    np.testing.assert_array_equal(labels, gm.predict(X))


def test_sample_matches_fitted_moments():
    X, _ = blobs(seed=5)
    gm = GaussianMixture(3, covariance_type="full", random_state=0).fit(X)
    S, y = gm.sample(60000)
    assert S.shape == (60000, 3) and y.shape == (60000,)
    for k in range(3):
        assert np.mean(y == k) == pytest.approx(gm.weights_[k], abs=0.01)
        np.testing.assert_allclose(S[y == k].mean(0), gm.means_[k], atol=0.05)
        np.testing.assert_allclose(np.cov(S[y == k].T), gm.covariances_[k], atol=0.08)


def test_collapsed_component_is_reseeded_not_nan():
    # Five identical rows and no regularisation: a component on them has a singular covariance.
    rng = np.random.default_rng(0)
    X = np.vstack([np.tile([[10.0, 10.0]], (5, 1)), rng.normal(size=(200, 2))])
    means = np.array([[10.0, 10.0], [0.0, 0.0], [0.5, 0.5]])
    with pytest.warns(Warning, match="collapsed"):
        gm = GaussianMixture(3, reg_covar=0.0, means_init=means, max_iter=20, random_state=0).fit(X)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.all(np.isfinite(getattr(gm, name))), name
    assert np.all(np.isfinite(gm.score_samples(X)))


def test_sklearn_raises_where_we_reseed():
    """The situation above is one scikit-learn cannot fit: the re-seeding is our addition."""
    rng = np.random.default_rng(0)
    X = np.vstack([np.tile([[10.0, 10.0]], (5, 1)), rng.normal(size=(200, 2))])
    means = np.array([[10.0, 10.0], [0.0, 0.0], [0.5, 0.5]])
    with pytest.raises(ValueError):
        SkGaussianMixture(3, reg_covar=0.0, means_init=means, max_iter=20, random_state=0).fit(X)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_map_prior_shrinks_towards_prior_and_stays_monotone(cov_type):
    X, _ = blobs(n=300, seed=6, scale=8.0)
    mle = GaussianMixture(3, covariance_type=cov_type, random_state=0).fit(X)
    prior = GaussianMixturePrior(mean=np.zeros(3), mean_precision=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, covariance_type=cov_type, means_init=mle.means_, prior=prior, tol=0,
                             max_iter=30).fit(X)
    # At a MAP fixed point mu_k = n_k xbar_k / (kappa0 + n_k): every mean moves towards 0.
    assert np.all(np.linalg.norm(gm.means_, axis=1) < np.linalg.norm(mle.means_, axis=1))
    assert np.all(np.diff(gm.lower_bounds_) > -1e-9)
    weak = GaussianMixture(3, covariance_type=cov_type, random_state=0, prior={"mean_precision": 1e-8},
                           max_iter=200, tol=1e-10).fit(X)
    assert np.all(np.isfinite(weak.means_))


def test_verbose_output(capsys):
    X, _ = blobs(n=200)
    GaussianMixture(2, verbose=1, verbose_interval=1, max_iter=3, tol=0).fit(X)
    err = capsys.readouterr().err
    assert "Iteration 1" in err and "lower bound" in err
    GaussianMixture(2, verbose=2, max_iter=3, tol=0).fit(X)
    assert "[" in capsys.readouterr().err
