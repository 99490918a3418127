"""Bad input gets a ValueError/TypeError that says what is wrong, never a kernel traceback."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlvm import GaussianMixture, GaussianMixturePrior, KMeans

rng = np.random.default_rng(0)
X = rng.normal(size=(50, 3))


def raises(exc, match, fn, *args):
    with pytest.raises(exc, match=match) as info:
        fn(*args)
    assert "numba" not in str(info.value).lower()
    return info


@pytest.mark.parametrize("Est", [GaussianMixture, KMeans])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_first_bad_row(Est, bad):
    Xb = X.copy()
    Xb[17, 1] = bad
    Xb[30, 0] = bad
    raises(ValueError, r"NaN or infinity.*row 17", Est(2).fit, Xb)
    fitted = Est(2).fit(X)
    raises(ValueError, r"row 17", fitted.predict, Xb)


@pytest.mark.parametrize("Est", [GaussianMixture, KMeans])
def test_shapes(Est):
    raises(ValueError, "2D array", Est(2).fit, X[:, 0])
    raises(ValueError, "dim 3", Est(2).fit, X[None])
    raises(ValueError, "sample", Est(2).fit, X[:0])
    raises(ValueError, "feature", Est(2).fit, X[:, :0])
    raises(ValueError, r"n_samples", Est(6).fit, X[:5])


@pytest.mark.parametrize("Est", [GaussianMixture, KMeans])
def test_dtypes(Est):
    raises((TypeError, ValueError), "string|float|number", Est(2).fit, np.array([["a", "b"], ["c", "d"], ["e", "f"]]))
    raises((TypeError, ValueError), "[Cc]omplex", Est(2).fit, X.astype(complex))
    fitted = Est(2).fit(X.astype(np.int64))  # integers are numbers: converted, not refused
    assert np.all(np.isfinite(fitted.predict(X)))


@pytest.mark.parametrize("Est", [GaussianMixture, KMeans])
def test_feature_count_at_predict(Est):
    fitted = Est(2).fit(X)
    raises(ValueError, "X has 2 features, but .* is expecting 3 features", fitted.predict, X[:, :2])


@pytest.mark.parametrize(
    "params, exc, match",
    [
        (dict(n_components=0), ValueError, "n_components"),
        (dict(n_components=-1), ValueError, "n_components"),
        (dict(n_components=1.5), TypeError, "n_components"),
        (dict(covariance_type="banana"), ValueError, "covariance_type"),
        (dict(reg_covar=-1e-3), ValueError, "reg_covar"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(max_iter=-1), ValueError, "max_iter"),
        (dict(n_init=0), ValueError, "n_init"),
        (dict(init_params="nope"), ValueError, "init_params"),
        (dict(learning_decay=0.5), ValueError, "learning_decay"),
        (dict(checkpoint=3), TypeError, "checkpoint"),
        (dict(backend="gpu-please"), ValueError, "backend"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(prior="strong"), TypeError, "prior"),
        (dict(prior=GaussianMixturePrior(weight_concentration=0.5)), ValueError, "weight_concentration"),
        (dict(prior={"mean_precision": -1.0}), ValueError, "mean_precision"),
        (dict(prior={"mean": [1.0, 2.0]}), ValueError, "prior mean"),
        (dict(n_components=2, weights_init=[0.5, 0.2]), ValueError, "'weights' should be normalized"),
        (dict(n_components=2, weights_init=[1.0]), ValueError, "'weights' should have the shape"),
        (dict(n_components=2, means_init=np.zeros((2, 4))), ValueError, "'means' should have the shape"),
        (dict(n_components=2, precisions_init=np.ones((2, 3))), ValueError, "'full precision' should have the shape"),
        (dict(n_components=2, precisions_init=np.stack([np.eye(3), -np.eye(3)])), ValueError, "positive-definite"),
        (dict(n_components=2, covariance_type="diag", precisions_init=np.array([[1, 1, 1], [1, 0, 1.0]])),
         ValueError, "'diag precision' should be positive"),
        (dict(n_components=2, covariance_type="spherical", precisions_init=np.array([1.0, np.nan])),
         ValueError, "NaN"),
    ],
)
def test_invalid_parameters(params, exc, match):
    raises(exc, match, GaussianMixture(**params).fit, X)


@pytest.mark.parametrize(
    "params, exc, match",
    [
        (dict(n_clusters=0), ValueError, "n_clusters"),
        (dict(n_clusters=2.0), TypeError, "n_clusters"),
        (dict(init="nope"), ValueError, "init"),
        (dict(n_clusters=2, init=np.zeros((3, 3))), ValueError, "initial centers"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(tol=-1), ValueError, "tol"),
    ],
)
def test_invalid_kmeans_parameters(params, exc, match):
    raises(exc, match, KMeans(**params).fit, X)


def test_unfitted_estimator():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        GaussianMixture(2).predict(X)
    with pytest.raises(NotFittedError):
        KMeans(2).predict(X)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 49), st.integers(0, 2), st.sampled_from([np.nan, np.inf, -np.inf]),
       st.sampled_from(["full", "tied", "diag", "spherical"]))
def test_any_non_finite_entry_is_reported_at_its_row(row, col, value, cov_type):
    Xb = X.copy()
    Xb[row, col] = value
    raises(ValueError, rf"row {row}\b", GaussianMixture(2, covariance_type=cov_type).fit, Xb)


def test_first_non_finite_row_reads_past_overflowing_sums_and_finds_the_row():
    from fastlvm._validation import first_non_finite_row

    X = np.full((300, 4), np.finfo(np.float32).max / 2, dtype=np.float32)  # finite, but its sum overflows
    assert first_non_finite_row(X, chunk_rows=64) is None
    X[200, 1], X[201, 2] = np.inf, -np.inf  # inf - inf: the chunk's sum is NaN
    assert first_non_finite_row(X, chunk_rows=64) == 200
    X[70, 3] = np.nan
    assert first_non_finite_row(X, chunk_rows=64) == 70
