"""The GPU path (fastlvm.engine with backend='cuda', fastlvm.kernels.cuda_gmm) against the CPU kernels.

Oracles: the CPU kernels' statistics and scores (fastlvm.kernels.cpu, an independent
implementation: whitened BLAS products there, direct per-row loops here), the CPU fits of
GaussianMixture and KMeans, and scipy's multivariate normal density for the scores.

Runs under NUMBA_ENABLE_CUDASIM=1 (set before numba is imported; the Makefile runs this marker in
its own process), or on a real GPU when there is one. Simulated threads are slow: shapes are small,
tiles are shrunk so that a few rows make ragged tiles and several tiles per block.
"""

import os
import sys
import types
import warnings

import numpy as np
import pytest
from scipy import stats

from numba import cuda

from fastlvm import GaussianMixture, KMeans
from fastlvm import engine as engines
from fastlvm.kernels import cuda_gmm
from fastlvm.mixture.covariance import COVARIANCE_TYPES
from fastlvm.mixture.stats import chunk_statistics, kernel_parameters

_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

pytestmark = [
    pytest.mark.cuda_sim,
    pytest.mark.skipif(not (_SIM or cuda.is_available()),
                       reason="CUDA kernels need a GPU or NUMBA_ENABLE_CUDASIM=1 set before numba is imported"),
]

CPU, GPU = engines.CpuEngine(), engines.CudaEngine()
K, D = 3, 3


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 16 rows and at most 2 blocks: 37 rows make a ragged last tile and a block with two tiles
    (and simulated blocks have few threads)."""
    monkeypatch.setattr(cuda_gmm, "TILE_ROWS", 16)
    monkeypatch.setattr(cuda_gmm, "MAX_BLOCKS", 2)


def parameters(name, rng, dtype=np.float64):
    cov = COVARIANCE_TYPES[name]
    a = rng.normal(size=(D, D))
    c = {"full": np.stack([a @ a.T / D + (k + 1) * np.eye(D) for k in range(K)]),
         "tied": a @ a.T / D + np.eye(D),
         "diag": rng.uniform(0.5, 2.0, (K, D)),
         "spherical": rng.uniform(0.5, 2.0, K)}[name]
    P, bad = cov.precision_cholesky(c)
    assert not bad
    weights = np.array([0.2, 0.3, 0.5])
    means = rng.normal(size=(K, D)) * 2 + 5
    return cov, weights, means, c, kernel_parameters(cov, weights, means, P, dtype)


def rows(rng, n=37, dtype=np.float64):
    return (rng.normal(size=(n, D)) * 2 + 5).astype(dtype)


def assert_same_statistics(a, b, tol):
    assert rel(a.n, b.n) < tol
    assert rel(a.s, b.s) < tol
    up = np.triu if a.second.shape[-1] == a.second.shape[-2] and a.second.shape[-1] > 1 else (lambda m: m)
    assert rel(up(a.second), up(b.second)) < tol  # layouts may keep one triangle
    assert abs(a.loglik - b.loglik) <= tol * abs(a.loglik)
    np.testing.assert_array_equal(a.shift, b.shift)
    assert a.worst[0][1] == b.worst[0][1]  # the worst-explained row
    assert abs(a.worst[0][0] - b.worst[0][0]) <= tol * abs(a.worst[0][0])


@pytest.mark.parametrize("name", list(COVARIANCE_TYPES))
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("prec_shared", [True, False], ids=["shared", "global"])
def test_statistics_equal_the_cpu_kernels(name, hard, prec_shared, monkeypatch):
    """Precision factors from shared memory, or from global memory when they do not fit."""
    if not prec_shared:
        monkeypatch.setattr(cuda_gmm, "_SHARED_BYTES", 0)
    assert cuda_gmm.shared_layout(COVARIANCE_TYPES[name].kind, D, cuda_gmm.TILE_ROWS)[0] == prec_shared
    rng = np.random.default_rng(1)
    cov, *_, kp = parameters(name, rng)
    X = rows(rng)
    a = chunk_statistics(X, cov, kp, hard, n_worst=2, engine=CPU)
    b = chunk_statistics(cuda.to_device(X), cov, kp, hard, n_worst=2, engine=GPU)
    assert_same_statistics(a, b, 1e-10)
    assert a.n.sum() == pytest.approx(X.shape[0], rel=1e-12)


@pytest.mark.parametrize("name", ["full", "spherical"])
def test_statistics_under_given_responsibilities_and_of_float32(name):
    rng = np.random.default_rng(2)
    cov, *_, kp = parameters(name, rng)
    X = rows(rng)
    resp = rng.dirichlet(np.ones(K), size=X.shape[0])
    a = chunk_statistics(X, cov, kp, resp=resp, engine=CPU)
    b = chunk_statistics(cuda.to_device(X), cov, kp, resp=resp, engine=GPU)
    for f in ("n", "s"):
        assert rel(getattr(a, f), getattr(b, f)) < 1e-10
    cov, *_, kp32 = parameters(name, rng, np.float32)
    X32 = rows(rng, dtype=np.float32)
    a = chunk_statistics(X32, cov, kp32, n_worst=1, engine=CPU)
    b = chunk_statistics(cuda.to_device(X32), cov, kp32, n_worst=1, engine=GPU)
    assert_same_statistics(a, b, 1e-4)  # the GPU computes in float64, the CPU in float32


def test_host_rows_are_streamed_through_both_buffers(monkeypatch):
    """Host input in sub-chunks of 10 rows on two streams gives the statistics of one pass."""
    monkeypatch.setattr(engines, "CUDA_STREAM_ROWS", 10)
    rng = np.random.default_rng(3)
    cov, *_, kp = parameters("full", rng)
    X = rows(rng)
    a = chunk_statistics(X, cov, kp, n_worst=2, engine=CPU)
    b = chunk_statistics(X, cov, kp, n_worst=2, engine=GPU)
    assert_same_statistics(a, b, 1e-10)
    C = rng.normal(size=(K, D)) * 2 + 5
    sums, counts, labels, d2 = GPU.assign(X, C)
    dist = ((X[:, None, :] - C[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(labels, dist.argmin(axis=1))
    np.testing.assert_allclose(d2, dist.min(axis=1), rtol=1e-12)
    np.testing.assert_allclose(counts, np.bincount(labels, minlength=K))
    np.testing.assert_allclose(sums, [X[labels == k].sum(axis=0) for k in range(K)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(COVARIANCE_TYPES))
def test_scores_equal_the_cpu_kernels_and_scipy(name, monkeypatch):
    if name == "full":  # one type reads its factors from global memory
        monkeypatch.setattr(cuda_gmm, "_SHARED_BYTES", 0)
    rng = np.random.default_rng(4)
    cov, weights, means, c, kp = parameters(name, rng)
    X = rows(rng, 21)
    ll, labels, logp = GPU.row_scores(cov.kind, X, kp, want_log_prob=True)
    ll_c, labels_c, logp_c = CPU.row_scores(cov.kind, X, kp, want_log_prob=True)
    assert rel(ll_c, ll) < 1e-10 and rel(logp_c, logp) < 1e-10
    np.testing.assert_array_equal(labels, labels_c)
    dense = [cov.component_covariance(c, k, D) for k in range(K)]
    oracle = np.stack([np.log(weights[k]) + stats.multivariate_normal.logpdf(X, means[k], dense[k]) for k in range(K)], 1)
    assert rel(oracle, logp) < 1e-10
    proba = GPU.rows_output("proba", cov.kind, kp, cuda.to_device(X))
    np.testing.assert_allclose(proba.copy_to_host(), np.exp(logp_c - ll_c[:, None]), rtol=1e-10, atol=1e-14)
    hard_ll, hard_labels, _ = GPU.row_scores(cov.kind, X, kp, hard=True)
    np.testing.assert_allclose(hard_ll, oracle.max(axis=1), rtol=1e-10)


MEANS = [[0.5, 0.0], [3.5, 4.0]]  # initial means near the two blobs


def two_blobs(n=80, seed=5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    X[: n // 2] += 4
    return X


@pytest.mark.parametrize("name", list(COVARIANCE_TYPES))
def test_a_fit_on_the_gpu_equals_the_cpu_fit(name):
    X = two_blobs()
    kw = dict(covariance_type=name, means_init=MEANS, max_iter=2, tol=0, random_state=0)
    cpu_fit = GaussianMixture(2, backend="cpu", **kw).fit(X)
    gpu_fit = GaussianMixture(2, backend="cuda", **kw).fit(X)
    for attr in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert rel(getattr(cpu_fit, attr), getattr(gpu_fit, attr)) < 1e-9, attr
    assert gpu_fit.lower_bound_ == pytest.approx(cpu_fit.lower_bound_, rel=1e-10)
    np.testing.assert_array_equal(gpu_fit.predict(X), cpu_fit.predict(X))


def test_device_input_is_fitted_in_place_and_answered_on_the_device():
    X = two_blobs()
    kw = dict(covariance_type="diag", max_iter=3, means_init=MEANS)
    host = GaussianMixture(2, backend="cpu", **kw).fit(X)
    dev = cuda.to_device(X)
    fit = GaussianMixture(2, **kw).fit(dev)  # 'auto' -> cuda
    assert rel(host.means_, fit.means_) < 1e-9
    labels = fit.predict(dev)
    assert engines.is_device_array(labels)
    np.testing.assert_array_equal(labels.copy_to_host(), host.predict(X))
    proba = fit.predict_proba(dev)
    np.testing.assert_allclose(proba.copy_to_host(), host.predict_proba(X), rtol=1e-9, atol=1e-15)
    assert fit.score(dev) == pytest.approx(host.score(X), rel=1e-10)
    X32 = X.astype(np.float32)
    out = GaussianMixture(2, max_iter=1, means_init=MEANS).fit(cuda.to_device(X32)).score_samples(cuda.to_device(X32))
    assert out.dtype == np.float32


def test_kmeans_on_the_gpu_equals_kmeans_on_the_cpu():
    X = two_blobs(90, seed=6)
    X[::3] -= 3
    cpu_fit = KMeans(3, random_state=0, max_iter=4, backend="cpu").fit(X)
    for data in (X, cuda.to_device(X)):
        gpu_fit = KMeans(3, random_state=0, max_iter=4, backend="cuda").fit(data)
        np.testing.assert_array_equal(gpu_fit.labels_, cpu_fit.labels_)
        np.testing.assert_allclose(gpu_fit.cluster_centers_, cpu_fit.cluster_centers_, rtol=1e-10, atol=1e-12)
        assert gpu_fit.inertia_ == pytest.approx(cpu_fit.inertia_, rel=1e-10)
        assert gpu_fit.n_iter_ == cpu_fit.n_iter_
    labels = gpu_fit.predict(cuda.to_device(X))
    np.testing.assert_array_equal(labels.copy_to_host(), cpu_fit.predict(X))


# ----------------------------------------------------------------------------- a stand-in for CuPy
class _FakeCupyArray:
    """What the engine reads of a CuPy array: its module, __cuda_array_interface__, and (in the
    simulator, where device memory is host memory) __array__."""

    __module__ = "cupy"

    def __init__(self, a):
        self.a = np.asarray(a)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.a.shape, "typestr": self.a.dtype.str, "data": (self.a.ctypes.data, False), "version": 3}

    def __array__(self, dtype=None, copy=None):
        return self.a

    def get(self):
        return self.a.copy()


class _DLPackOnly:
    """A device array that offers DLPack only (as JAX does)."""

    def __init__(self, a):
        self.a = a

    def __dlpack_device__(self):
        return (2, 0)


@pytest.fixture
def fake_cupy(monkeypatch):
    module = types.ModuleType("cupy")
    module.ndarray = _FakeCupyArray
    module.asarray = lambda a: _FakeCupyArray(engines.to_host(a))
    module.from_dlpack = lambda x: _FakeCupyArray(x.a)
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module


@pytest.mark.skipif(not _SIM, reason="the stand-in's memory is host memory")
def test_cupy_in_cupy_out_and_dlpack_through_cupy(fake_cupy):
    X = two_blobs()
    host = GaussianMixture(2, covariance_type="spherical", max_iter=2, means_init=MEANS, backend="cpu").fit(X)
    fit = GaussianMixture(2, covariance_type="spherical", max_iter=2, means_init=MEANS).fit(_FakeCupyArray(X))
    out = fit.predict_proba(_FakeCupyArray(X))
    assert isinstance(out, _FakeCupyArray)
    np.testing.assert_allclose(out.get(), host.predict_proba(X), rtol=1e-9, atol=1e-15)
    assert engines.is_device_array(_DLPackOnly(X))
    np.testing.assert_array_equal(fit.predict(_DLPackOnly(X)).get(), host.predict(X))


@pytest.mark.skipif(not _SIM, reason="the stand-in's memory is host memory")
def test_dlpack_input_without_cupy_names_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match="CuPy"):
        GaussianMixture(2).fit(_DLPackOnly(two_blobs()))


# ----------------------------------------------------------------------------- bad input
def test_bad_device_input_is_named():
    X = two_blobs()
    X[7, 1] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        GaussianMixture(2).fit(cuda.to_device(X))
    with pytest.raises(TypeError, match="float32 or float64"):
        GaussianMixture(2).fit(cuda.to_device(np.ones((10, 2), dtype=np.int32)))
    with pytest.raises(ValueError, match="2D"):
        GaussianMixture(2).fit(cuda.to_device(np.ones(10)))
    with pytest.raises(ValueError, match="backend='cpu'"):
        GaussianMixture(2, backend="cpu").fit(cuda.to_device(two_blobs()))
    fit = GaussianMixture(2, max_iter=1, means_init=MEANS).fit(cuda.to_device(two_blobs()))
    with pytest.raises(ValueError, match="3 features"):
        fit.predict(cuda.to_device(np.ones((4, 3))))
    with pytest.raises(ValueError, match="sample weights"):
        KMeans(2, backend="cuda").fit(two_blobs(), sample_weight=np.arange(80.0))
    import scipy.sparse as sp

    with pytest.raises(TypeError, match="sparse"):
        KMeans(2, backend="cuda").fit(sp.random(20, 3, density=0.5, format="csr"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KMeans(2, backend="cuda", max_iter=2, random_state=0).fit(two_blobs(), sample_weight=np.ones(80)).n_iter_ >= 1
