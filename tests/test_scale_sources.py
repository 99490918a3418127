"""Out-of-core EM: memmaps, HDF5 and other row-sliceable arrays, chunk callables; chunked inference;
initialisation on a sample; re-centring of statistics; progress; bad chunks.

The oracle for a streamed fit is scikit-learn's GaussianMixture (and the in-memory fit, which a
streamed fit must reproduce exactly: the same chunks reach the same kernel)."""

import tracemalloc
import warnings

import h5py
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from fastlvm import GaussianMixture
from fastlvm.mixture import gaussian_mixture as gm_module
from fastlvm.mixture.covariance import COVARIANCE_TYPES
from fastlvm.mixture.stats import chunk_statistics, kernel_parameters

COV_TYPES = ["full", "tied", "diag", "spherical"]
FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def mixture_data(n, d=6, k=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(dtype)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """200,000 x 6 float64 rows on disk as an .npy memmap, and the same rows in memory."""
    X = mixture_data(200_000)
    path = tmp_path_factory.mktemp("memmap") / "x.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=X.dtype, shape=X.shape)
    mm[:] = X
    mm.flush()
    del mm
    return X, np.load(path, mmap_mode="r")


def quiet_fit(est, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X)


def sk_start(X, K, cov_type):
    sk = quiet_fit(SkGaussianMixture(K, covariance_type=cov_type, max_iter=2, random_state=0), X[:20_000])
    return dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_memmap_fit_matches_sklearn_and_in_memory(big, cov_type):
    X, mm = big
    init = sk_start(X, 4, cov_type)
    kw = dict(covariance_type=cov_type, max_iter=3, tol=0, chunk_size=40_000, **init)
    streamed = quiet_fit(GaussianMixture(4, **kw), mm)
    in_memory = quiet_fit(GaussianMixture(4, **kw), X)
    sk = quiet_fit(SkGaussianMixture(4, covariance_type=cov_type, max_iter=3, tol=0, **init), X)
    for name in FITTED:
        np.testing.assert_array_equal(getattr(streamed, name), getattr(in_memory, name))
        assert rel(getattr(streamed, name), getattr(sk, name)) < 1e-8, name
    assert streamed.lower_bound_ == pytest.approx(sk.lower_bound_, rel=1e-10)
    # Chunked inference on the memmap.
    assert rel(streamed.score_samples(mm), sk.score_samples(X)) < 1e-10
    np.testing.assert_array_equal(streamed.predict(mm), sk.predict(X))
    assert rel(streamed.predict_proba(mm[:50_000]), sk.predict_proba(X[:50_000])) < 1e-8
    assert streamed.score(mm) == pytest.approx(sk.score(X), rel=1e-12)


def test_memmap_fit_allocates_nothing_proportional_to_rows(big):
    """NumPy allocations (traced by tracemalloc) do not grow with the rows of a memmap."""
    X, mm = big
    est = GaussianMixture(4, max_iter=2, tol=0, chunk_size=20_000, init_size=5_000, random_state=0)
    quiet_fit(est, mm[:20_000])  # compile and warm up outside the traced region
    peaks = []
    for n in (50_000, 200_000):
        tracemalloc.start()
        try:
            quiet_fit(est, mm[:n])
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 1.2 * peaks[0], f"peak traced allocations grew from {peaks[0]} to {peaks[1]} bytes"
    assert peaks[1] < 0.1 * X.nbytes


def test_out_of_core_initialises_on_a_sample(big, monkeypatch):
    X, mm = big
    seen = []

    class SpyKMeans(gm_module.KMeans):
        def fit(self, X, y=None):
            seen.append(X.shape[0])
            return super().fit(X, y)

    monkeypatch.setattr(gm_module, "KMeans", SpyKMeans)
    n = 120_000
    sampled = quiet_fit(GaussianMixture(4, max_iter=10, random_state=0), mm[:n])
    assert seen == [gm_module.DEFAULT_INIT_SIZE]
    quiet_fit(GaussianMixture(4, max_iter=1, random_state=0, init_size=2_000), mm)
    assert seen[-1] == 2_000
    full = quiet_fit(GaussianMixture(4, max_iter=10, random_state=0), X[:n])  # in memory: every row
    assert seen[-1] == n
    # Well separated clusters: the sample finds the same optimum.
    assert sampled.score(mm[:n]) == pytest.approx(full.score(X[:n]), rel=1e-6)


def test_hdf5_and_duck_typed_arrays_stream_like_memory(tmp_path):
    X = mixture_data(30_000, seed=1).astype(np.float32)
    kw = dict(max_iter=5, tol=0, chunk_size=4_000, random_state=0)
    ref = quiet_fit(GaussianMixture(3, **kw), X)

    class Rows:
        """Only a 2-D shape, a NumPy dtype and row slicing: the protocol Zarr arrays follow."""

        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype
            self.reads = 0

        def __getitem__(self, key):
            assert isinstance(key, slice), "only row slices are read"
            self.reads += 1
            return self.a[key].copy()

    rows = Rows(X)
    duck = quiet_fit(GaussianMixture(3, **kw), rows)
    assert rows.reads > 5
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("x", data=X, chunks=(1000, X.shape[1]))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        h5 = quiet_fit(GaussianMixture(3, **kw), f["x"])
        np.testing.assert_array_equal(h5.predict(f["x"]), ref.predict(X))
        np.testing.assert_array_equal(h5.score_samples(f["x"]), ref.score_samples(X))
    for est in (duck, h5):
        assert est.means_.dtype == np.float32 and est.n_features_in_ == X.shape[1]
        for name in FITTED:
            np.testing.assert_array_equal(getattr(est, name), getattr(ref, name))


def test_zarr_array_streams():
    zarr = pytest.importorskip("zarr")
    X = mixture_data(5_000, seed=2)
    z = zarr.array(X, chunks=(700, X.shape[1]))
    kw = dict(max_iter=3, tol=0, chunk_size=1_000, random_state=0)
    np.testing.assert_array_equal(quiet_fit(GaussianMixture(3, **kw), z).means_,
                                  quiet_fit(GaussianMixture(3, **kw), X).means_)


def test_integer_memmap_is_converted_per_chunk(tmp_path):
    X = np.round(mixture_data(20_000, seed=3) * 10).astype(np.int32)
    mm = np.lib.format.open_memmap(tmp_path / "i.npy", mode="w+", dtype=np.int32, shape=X.shape)
    mm[:] = X
    kw = dict(max_iter=3, tol=0, chunk_size=3_000, random_state=0)
    est = quiet_fit(GaussianMixture(3, **kw), mm)
    assert est.means_.dtype == np.float64
    np.testing.assert_array_equal(est.means_, quiet_fit(GaussianMixture(3, **kw), X.astype(np.float64)).means_)


def chunker(X, size):
    return lambda: (X[i : i + size] for i in range(0, X.shape[0], size))


@pytest.mark.parametrize("piece", [1_000, 3_000, 25_000])
def test_chunk_callable_matches_array(piece):
    """Pieces of any size are re-chunked to chunk_size, so the fit is the in-memory fit."""
    X = mixture_data(20_000, seed=4)
    # One start: two starts that reach the same optimum (labels permuted) tie to 1e-15, and which
    # one wins would then be decided by rounding, not by the data source.
    kw = dict(max_iter=6, tol=0, chunk_size=3_000, random_state=0, n_init=1)
    ref = quiet_fit(GaussianMixture(3, **kw), X)
    est = quiet_fit(GaussianMixture(3, **kw), chunker(X, piece))
    for name in FITTED:
        assert rel(getattr(est, name), getattr(ref, name)) < 1e-12, name
    assert est.n_iter_ == ref.n_iter_
    np.testing.assert_array_equal(est.predict(chunker(X, piece)), ref.predict(X))


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_recentred_statistics_equal_statistics_taken_about_the_new_shift(cov_type):
    """Same responsibilities, two parameter sets with different means (hence shifts): re-centring
    the statistics about the first onto the second's shift gives the second's statistics."""
    rng = np.random.default_rng(5)
    N, D, K = 500, 4, 3
    X = rng.normal(size=(N, D)) * 3 + 10
    resp = rng.dirichlet(np.ones(K), size=N)
    cov = COVARIANCE_TYPES[cov_type]
    P = cov.isotropic(K, D)
    a = kernel_parameters(cov, np.array([0.2, 0.3, 0.5]), rng.normal(size=(K, D)) + 9, P, np.float64)
    b = kernel_parameters(cov, np.array([0.4, 0.4, 0.2]), rng.normal(size=(K, D)) + 11, P, np.float64)
    st_a = chunk_statistics(X, cov, a, resp=resp)
    st_b = chunk_statistics(X, cov, b, resp=resp)
    assert not np.allclose(st_a.shift, st_b.shift)
    moved = st_a.recentred(st_b.shift)
    np.testing.assert_allclose(moved.n, st_b.n, rtol=1e-12)
    np.testing.assert_allclose(moved.s, st_b.s, rtol=1e-10, atol=1e-9)
    # Compare the symmetric matrices (layouts may keep only the upper triangle).
    up = np.triu if cov_type in ("full", "tied") else (lambda m: m)
    np.testing.assert_allclose(up(moved.second), up(st_b.second), rtol=1e-10)
    np.testing.assert_array_equal(moved.shift, st_b.shift)


def test_verbose_reports_rows_per_second(big, capsys):
    _, mm = big
    quiet_fit(GaussianMixture(2, max_iter=2, tol=0, verbose=1, verbose_interval=1, init_size=1000), mm[:50_000])
    err = capsys.readouterr().err
    assert "Iteration 2" in err and "rows/s" in err


# ---------------------------------------------------------------- bad chunks
def test_bad_chunk_sources_raise_value_errors():
    X = mixture_data(3_000, seed=6)

    def source(*pieces):
        return lambda: iter(pieces)

    cases = [
        (source(X[:1000], X[1000:2000, :5]), r"chunk at row 1000 has 5 features, expected 6"),
        (source(X[:1000], X[1000:2000].astype(np.float32)), r"row 1000 has dtype float32.*first chunk had float64"),
        (source(X[:1000], np.full((10, 6), "a")), r"row 1000 has dtype <U1"),
        (source(np.full((10, 6), "a")), r"must hold numbers"),
        (source(X[:1000].astype(complex)), r"[Cc]omplex"),
        (source(X[:1000], X[:0], X[1000:]), r"chunk at row 1000 is empty"),
        (source(X[:1000], X[1000, :]), r"chunk at row 1000 is 1-D"),
        (source(), r"yielded no rows"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            GaussianMixture(2).fit(bad)
    Xn = X.copy()
    Xn[2345, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 2345\)"):
        GaussianMixture(2).fit(chunker(Xn, 700))
    with pytest.raises(TypeError, match="iterable"):
        GaussianMixture(2).fit(lambda: 42)


def test_a_chunk_source_must_be_fresh_on_every_pass():
    X = mixture_data(3_000, seed=7)
    once = iter([X[:1500], X[1500:]])
    with pytest.raises(ValueError, match=r"yielded 0 rows on this pass but 3000 on the first"):
        GaussianMixture(2, max_iter=3).fit(lambda: once)


def test_bad_out_of_core_arrays(tmp_path):
    X = mixture_data(2_000, seed=8)
    Xn = X.copy()
    Xn[1777, 0] = np.inf
    mm = np.lib.format.open_memmap(tmp_path / "n.npy", mode="w+", dtype=np.float64, shape=X.shape)
    mm[:] = Xn
    with pytest.raises(ValueError, match=r"first at row 1777"):
        GaussianMixture(2, chunk_size=500).fit(mm)
    fitted = GaussianMixture(2).fit(X)
    with pytest.raises(ValueError, match=r"first at row 1777"):
        fitted.predict(mm)
    with pytest.raises(ValueError, match=r"X has 5 features, but GaussianMixture is expecting 6"):
        fitted.predict(np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=np.float64, shape=(10, 5)))
    empty = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float64, shape=(0, 6))
    with pytest.raises(ValueError, match="0 sample"):
        GaussianMixture(2).fit(empty)
    with pytest.raises(ValueError, match="init_size"):
        GaussianMixture(3, init_size=2).fit(X)
    with pytest.raises(TypeError, match="checkpoint"):
        GaussianMixture(2, checkpoint=3).fit(X)
