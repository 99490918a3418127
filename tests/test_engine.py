"""The dispatch point (fastlvm.engine) in the main suite: backend resolution, device-input detection,
the errors for a missing GPU, the rule that no estimator module imports a kernel or numba, and host
BLAS on one thread beside the kernels."""

import ast
import os
import pathlib

import numpy as np
import pytest
import torch

from fastlvm import GaussianMixture, KMeans
from fastlvm import engine as engines
from fastlvm.mixture.covariance import COVARIANCE_TYPES
from fastlvm.mixture.stats import chunk_statistics, kernel_parameters

MIXTURE = pathlib.Path(engines.__file__).parent / "mixture"


def _gpu_or_simulator():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    from numba import cuda

    return cuda.is_available()


@pytest.mark.parametrize("path", sorted(MIXTURE.glob("*.py")), ids=lambda p: p.name)
def test_estimator_modules_import_no_kernel_and_no_numba(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    bad = {m for m in imported if m.split(".")[0] == "numba" or m.startswith("fastlvm.kernels")}
    assert not bad, f"{path.name} imports {bad}; estimators reach kernels through fastlvm.engine"


def test_auto_is_the_cpu_for_host_input_and_names_are_checked():
    assert engines.resolve("auto", np.ones((3, 2))).backend == "cpu"
    assert engines.resolve("auto", torch.ones(3, 2)).backend == "cpu"
    assert engines.resolve("cpu").backend == "cpu"
    with pytest.raises(ValueError, match="backend"):
        engines.resolve("gpu")
    with pytest.raises(ValueError, match="backend"):
        GaussianMixture(backend="gpu").fit(np.ones((4, 2)))


class _Interface:
    __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f8", "data": (0, False), "version": 3}


class _DLPack:
    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack_device__(self):
        return (self.device_type, 0)


def test_device_input_is_recognised_by_its_interfaces():
    assert engines.is_device_array(_Interface())
    assert engines.is_device_array(_DLPack(2))  # kDLCUDA
    assert not engines.is_device_array(_DLPack(1))  # kDLCPU
    assert not engines.is_device_array(_DLPack(3))  # pinned host memory
    assert not engines.is_device_array(np.ones(3))
    assert not engines.is_device_array(torch.ones(3))  # a CPU tensor (its interface attribute raises)
    with pytest.raises(ValueError, match="backend='cpu'"):
        engines.resolve("cpu", _Interface())


@pytest.mark.skipif(_gpu_or_simulator(), reason="there is a GPU (or the simulator)")
def test_backend_cuda_without_a_gpu_says_what_is_missing():
    X = np.random.default_rng(0).normal(size=(20, 2))
    for estimator in (GaussianMixture(2, backend="cuda"), KMeans(2, backend="cuda")):
        with pytest.raises(RuntimeError, match="GPU.*fastlvm\\[cuda\\]"):
            estimator.fit(X)
    with pytest.raises(RuntimeError, match="GPU"):
        GaussianMixture(2).fit(_Interface())  # device input asks for the GPU path


@pytest.mark.parametrize("name", list(COVARIANCE_TYPES))
@pytest.mark.parametrize("K", [1, 3])
def test_recentring_at_one_feature_follows_the_covariance_type(name, K):
    """At D = 1 (and K = 1) the layouts of several types have the same shape; the covariance type, not
    the shape, decides how the second moment moves to another shift."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 1)) * 2 + 10
    resp = rng.dirichlet(np.ones(K), size=200)
    cov = COVARIANCE_TYPES[name]
    P = cov.isotropic(K, 1)
    a = kernel_parameters(cov, np.full(K, 1.0 / K), rng.normal(size=(K, 1)) + 9, P, np.float64)
    b = kernel_parameters(cov, np.arange(1.0, K + 1) / np.arange(1.0, K + 1).sum(), rng.normal(size=(K, 1)) + 11, P,
                          np.float64)
    st_a, st_b = chunk_statistics(X, cov, a, resp=resp), chunk_statistics(X, cov, b, resp=resp)
    moved = st_a.recentred(st_b.shift)
    np.testing.assert_allclose(moved.second, st_b.second, rtol=1e-10)
    np.testing.assert_allclose(moved.s, st_b.s, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("estimator, loop", [(KMeans, "fastlvm.mixture.kmeans.lloyd"),
                                             (GaussianMixture, "fastlvm.mixture.gaussian_mixture.run_em")])
def test_host_blas_runs_on_one_thread_during_the_fit_loop(monkeypatch, estimator, loop):
    # The kernels are the parallel part: a threaded BLAS call on the host (seeding, inertia, the M-step's
    # D x D algebra) would leave OpenBLAS's threads spinning beside their workers. Every run of the
    # loop (one per n_init) sees BLAS limited to one thread.
    import importlib

    from threadpoolctl import threadpool_info

    module_name, name = loop.rsplit(".", 1)
    module = importlib.import_module(module_name)
    seen, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    estimator(2, n_init=2, random_state=0).fit(np.random.default_rng(0).normal(size=(500, 3)))
    assert len(seen) == 2 and all(threads == {1} for threads in seen)
