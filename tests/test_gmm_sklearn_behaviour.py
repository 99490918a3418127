"""GaussianMixture behaves as scikit-learn's where a user swapping one for the other would notice:
warm starts, max_iter=0, the exact wording of errors and warnings, degenerate data at reg_covar=0,
output dtypes. scikit-learn's estimator is the oracle: the same call is made on both."""

import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from fastlvm import GaussianMixture
from fastlvm.mixture.em import Run, best_of, change_below, run_em

COV_TYPES = ["full", "tied", "diag", "spherical"]


def blobs(n=300, d=2, k=2, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * scale
    return centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))


def error_of(fn):
    """(type, message) of the exception fn raises."""
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


def same_error(make, X, **params):
    """Both estimators fail alike on the same call: the same exception class family and message."""
    ours_type, ours = error_of(lambda: make(GaussianMixture(**params), X))
    sk_type, sk = error_of(lambda: make(SkGaussianMixture(**params), X))
    assert ours == sk
    assert issubclass(ours_type, ValueError) == issubclass(sk_type, ValueError)
    return ours


# ---------------------------------------------------------------- warm start and max_iter=0
def test_warm_start_continues_from_lower_bound_and_converges():
    X = blobs(seed=1)
    gm = GaussianMixture(2, warm_start=True, max_iter=1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        bounds = []
        for n_fits in range(1, 51):
            gm.fit(X)
            bounds.append(gm.lower_bound_)
            if gm.converged_:
                break
    assert gm.converged_, bounds
    assert gm.n_iter_ == 1
    # Each fit's change is measured from the previous fit's bound: with tol=1e-3 the run stops once
    # one iteration moves the bound by less than that.
    assert abs(bounds[-1] - bounds[-2]) < gm.tol
    assert np.all(np.diff(bounds) > -1e-9)
    # The same number of single-iteration fits equals one cold fit of that many iterations.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cold = GaussianMixture(2, max_iter=n_fits, tol=0, random_state=0).fit(X)
    np.testing.assert_allclose(gm.means_, cold.means_, rtol=1e-10)


def test_warm_start_single_iterations_match_sklearn():
    X = blobs(seed=2)
    init = dict(weights_init=[0.5, 0.5], means_init=[[-1.0, 0.0], [1.0, 0.0]], precisions_init=np.stack([np.eye(2)] * 2))
    ours = GaussianMixture(2, warm_start=True, max_iter=1, **init)
    sk = SkGaussianMixture(2, warm_start=True, max_iter=1, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(30):
            ours.fit(X)
            sk.fit(X)
            assert ours.converged_ == sk.converged_
            assert ours.lower_bound_ == pytest.approx(sk.lower_bound_, rel=1e-10)
            if sk.converged_:
                break
    assert sk.converged_


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_max_iter_zero_returns_the_initialisation(cov_type):
    X = blobs(seed=3)
    means = np.array([[20.0, 30.0], [30.0, 25.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning: max_iter=0 asks for the initialisation
        gm = GaussianMixture(2, covariance_type=cov_type, means_init=means, max_iter=0).fit(X)
    np.testing.assert_array_equal(gm.means_, means)
    assert (gm.n_iter_, gm.converged_, gm.lower_bound_, gm.lower_bounds_) == (0, False, -math.inf, [])
    # Every initial parameter given: exactly those come back (covariances_ as their inverses).
    sk = SkGaussianMixture(2, covariance_type=cov_type, means_init=means, max_iter=1).fit(X)
    init = dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)
    ours = GaussianMixture(2, covariance_type=cov_type, max_iter=0, **init).fit(X)
    for name in ("weights_", "means_", "precisions_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(sk, name), rtol=1e-10, err_msg=name)


# ---------------------------------------------------------------- wording of errors and warnings
X4 = np.random.default_rng(0).normal(size=(40, 3))


@pytest.mark.parametrize("params", [
    dict(n_components=2, weights_init=np.ones((2, 1)) / 2),
    dict(n_components=2, weights_init=[1.2, 1.5]),
    dict(n_components=2, weights_init=[0.5, 0.2]),
    dict(n_components=2, means_init=np.zeros((3, 3))),
    dict(n_components=2, precisions_init=np.ones((3, 3, 3))),
    dict(n_components=2, covariance_type="tied", precisions_init=np.ones((4, 4))),
    dict(n_components=2, covariance_type="diag", precisions_init=np.ones((3, 3))),
    dict(n_components=2, covariance_type="spherical", precisions_init=np.ones(3)),
    dict(n_components=2, precisions_init=np.stack([np.eye(3), -np.eye(3)])),
    dict(n_components=2, covariance_type="tied", precisions_init=np.ones((3, 3))),
    dict(n_components=2, covariance_type="diag", precisions_init=-np.ones((2, 3))),
    dict(n_components=2, covariance_type="spherical", precisions_init=np.array([1.0, 0.0])),
    dict(n_components=0),
    dict(n_components=1.5),
    dict(covariance_type="banana"),
    dict(tol=-1.0),
    dict(reg_covar=-1e-3),
    dict(max_iter=-1),
    dict(n_init=0),
    dict(init_params="nope"),
    dict(verbose_interval=0),
    dict(warm_start="yes"),
    dict(n_components=50),
], ids=lambda p: "-".join(f"{k}" for k in p if k != "n_components") or f"K={p['n_components']}")
def test_errors_have_sklearn_wording(params):
    same_error(lambda est, X: est.fit(X), X4, **params)


def test_sample_errors_have_sklearn_wording():
    with pytest.raises(Exception, match="This GaussianMixture instance is not fitted"):
        GaussianMixture(2).sample(1)
    gm = GaussianMixture(2, random_state=0).fit(X4)
    with pytest.raises(ValueError, match=re.escape("Invalid value for 'n_samples': 0 . The sampling requires at "
                                                   "least one sample.")):
        gm.sample(0)


def test_convergence_warning_has_sklearn_wording():
    def message(est):
        with pytest.warns(ConvergenceWarning) as caught:
            est.fit(X4)
        return [str(w.message) for w in caught if w.category is ConvergenceWarning]

    kw = dict(n_components=3, max_iter=1, random_state=0)
    assert message(GaussianMixture(**kw)) == message(SkGaussianMixture(**kw))


# ---------------------------------------------------------------- degenerate data at reg_covar=0
@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_degenerate_data_without_regularisation_raises_sklearn_error(cov_type, dtype):
    # Two distinct points, repeated: no component can have a positive definite covariance.
    X = np.vstack([np.ones((5, 4)), np.zeros((5, 4))]).astype(dtype)
    params = dict(n_components=10, reg_covar=0, covariance_type=cov_type, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        message = same_error(lambda est, X: est.fit(X), X, **params)
    assert "increase reg_covar" in message
    # Regularised, the same data fits (re-seeding the empty components).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(**{**params, "reg_covar": 1e-6}).fit(X)
    assert np.all(np.isfinite(gm.covariances_)) and np.all(np.isfinite(gm.score_samples(X)))


def test_failed_fit_leaves_nothing_behind():
    X = np.vstack([np.ones((5, 4)), np.zeros((5, 4))])
    gm = GaussianMixture(10, reg_covar=0, random_state=0)
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X)
    assert [k for k in vars(gm) if k.startswith("_")] == []
    gm.set_params(reg_covar=1e-3, n_components=2).fit(X)
    assert [k for k in vars(gm) if k.startswith("_")] == []


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outputs_in_the_input_dtype_as_sklearn(dtype):
    X = blobs(seed=4).astype(dtype)
    ours = GaussianMixture(2, random_state=0).fit(X)
    sk = SkGaussianMixture(2, random_state=0).fit(X)
    for method in ("score_samples", "predict_proba"):
        a, b = getattr(ours, method)(X), getattr(sk, method)(X)
        assert a.dtype == b.dtype == dtype, method
        np.testing.assert_allclose(a, b, rtol=1e-3 if dtype == np.float32 else 1e-7, atol=1e-4)
    for attr in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        assert getattr(ours, attr).dtype == getattr(sk, attr).dtype == dtype, attr
    assert ours.predict(X).dtype == sk.predict(X).dtype
    (Xs, ys), (Xk, yk) = ours.sample(5), sk.sample(5)
    assert (Xs.dtype, ys.dtype) == (Xk.dtype, yk.dtype)
    assert isinstance(ours.score(X), float) and isinstance(sk.score(X), float)
    assert ours.score(X) == ours.score_samples(X).mean()  # the mean in the rows' dtype, as scikit-learn's


# ---------------------------------------------------------------- verbose
def test_verbose_two_shows_a_tqdm_bar(capsys):
    GaussianMixture(2, verbose=2, max_iter=3, tol=0, random_state=0).fit(blobs())
    err = capsys.readouterr().err
    assert "Initialization 0" in err and "3/3" in err and "lower_bound=" in err


# ---------------------------------------------------------------- the EM driver
def test_run_em_stops_on_small_change_or_max_iter():
    # A step that halves x, with objective -x^2 of the old x: changes shrink by 4 each step.
    step = lambda x: (x / 2, -(x**2))  # noqa: E731
    run = run_em(step, Run(8.0), max_iter=100, converged=change_below(1e-3))
    assert run.converged and run.params == 8.0 / 2**run.n_iter
    assert run.history == tuple(-((8.0 / 2**i) ** 2) for i in range(run.n_iter))
    assert abs(run.history[-1] - run.history[-2]) < 1e-3 <= abs(run.history[-2] - run.history[-3])
    seen = []
    short = run_em(step, Run(8.0), max_iter=3, converged=change_below(1e-3), on_step=seen.append)
    assert (short.n_iter, short.converged, [r.n_iter for r in seen]) == (3, False, [1, 2, 3])
    # Continuing a run carries its objective: the first new step's change is measured from it.
    assert run_em(step, Run(1e-3, objective=-1e-6), 10, change_below(1e-3)).n_iter == 1
    assert run_em(step, Run(8.0), 0, change_below(1e-3)) == Run(8.0)


def test_best_of_keeps_the_higher_objective_and_the_later_tie_at_minus_infinity():
    a, b = Run("a", objective=-1.0), Run("b", objective=-2.0)
    assert best_of(None, a) is a and best_of(a, b) is a and best_of(b, a) is a
    assert best_of(Run("x"), Run("y")).params == "y"


def test_array_api_dispatch_keeps_the_input_namespace():
    """Under scikit-learn's array_api_dispatch, torch CPU tensors in give torch tensors out (fitted
    parameters, per-row answers, samples), equal to the NumPy fit's; floats for the scores. Own
    process: dispatch needs SCIPY_ARRAY_API=1 before SciPy is imported."""
    pytest.importorskip("torch")
    code = """if True:
        import numpy as np, torch, sklearn
        from fastlvm import GaussianMixture
        X = np.random.default_rng(0).normal(size=(300, 3)) + np.repeat(np.eye(3) * 4, 100, axis=0)
        for dtype in (np.float32, np.float64):
            Xd, start = X.astype(dtype), X[[0, 100, 200]].astype(dtype)
            make = lambda means: GaussianMixture(3, init_params="random_from_data", means_init=means, random_state=0)
            ref = make(start).fit(Xd)
            with sklearn.config_context(array_api_dispatch=True):
                Xt = torch.asarray(Xd)
                gm = make(torch.asarray(start)).fit(Xt)
                outs = [gm.predict(Xt), gm.predict_proba(Xt), gm.score_samples(Xt), *gm.sample(5)]
                assert all(isinstance(o, torch.Tensor) for o in outs), [type(o) for o in outs]
                assert isinstance(gm.score(Xt), float) and isinstance(gm.bic(Xt), float)
            for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
                got = getattr(gm, name)
                assert isinstance(got, torch.Tensor) and got.dtype == Xt.dtype, name
                np.testing.assert_array_equal(got.numpy(), getattr(ref, name))
            np.testing.assert_array_equal(outs[0].numpy(), ref.predict(Xd))
            np.testing.assert_array_equal(outs[2].numpy(), ref.score_samples(Xd))
        with sklearn.config_context(array_api_dispatch=True):  # scikit-learn's rule there, any input
            for init in ("kmeans", "k-means++"):
                try:
                    GaussianMixture(3, init_params=init).fit(X)
                    raise AssertionError(init)
                except NotImplementedError as e:
                    assert "Allowed `init_params` are ['random', 'random_from_data']" in str(e)
        GaussianMixture(3).fit(X)  # and only there
        print("ok")
    """
    env = dict(os.environ, SCIPY_ARRAY_API="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
