"""What a fit compiles: a Gaussian mixture only its own covariance type's kernels (the data's
moments are plain NumPy), k-means only its data layout's, so a first fit in an empty Numba cache stays
short."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastlvm.data.sources import ArraySource
from fastlvm.mixture.fit_context import data_moments

_PROBE = """
import json, numpy as np
from fastlvm import GaussianMixture
from fastlvm.kernels import cpu
X = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
gm = GaussianMixture(2, covariance_type={cov!r}, init_params="random", max_iter=3, random_state=0).fit(X)
fit = [k for k in range(4) if cpu._drivers(k)[0].signatures or cpu._drivers(k)[1].signatures]
gm.predict_proba(X)
scores = [k for k in range(4) if cpu._drivers(k)[1].signatures]
print(json.dumps([fit, scores]))
"""


@pytest.mark.parametrize("cov", ["tied", "diag"])
def test_a_fit_runs_only_its_own_covariance_types_kernels(cov):
    # A fresh process: which per-type drivers were compiled (or loaded from the cache) by one fit,
    # and by predict_proba after it.
    out = subprocess.run([sys.executable, "-c", _PROBE.format(cov=cov)], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=300)
    assert out.returncode == 0, out.stderr
    fit, scores = json.loads(out.stdout.strip().splitlines()[-1])
    kind = {"full": 0, "tied": 1, "diag": 2, "spherical": 3}[cov]
    assert fit == [kind]  # the statistics driver of this type only, and no per-row scores yet
    assert scores == [kind]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_data_moments_match_numpy(dtype):
    rng = np.random.default_rng(3)
    # far from the origin, where moments about zero would cancel in float32
    X = (1e3 + rng.normal(size=(1000, 5)) @ rng.normal(size=(5, 5))).astype(dtype)
    mean, cov = data_moments(ArraySource(X, trusted=True), chunk_rows=128)  # several chunks
    Xd = X.astype(np.float64)
    np.testing.assert_allclose(mean, Xd.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(Xd, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)


_KMEANS_PROBE = """
import json, numpy as np, scipy.sparse as sp
from fastlvm import KMeans
from fastlvm.kernels import kmeans
X = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
KMeans(3, n_init=1, random_state=0).fit(X)
made_dense = [kmeans._kernels.cache_info().currsize, kmeans._full_pass.cache_info().currsize]
KMeans(3, n_init=1, random_state=0).fit(sp.csr_matrix(X))
made = [kmeans._kernels.cache_info().currsize, kmeans._full_pass.cache_info().currsize]
print(json.dumps([made_dense, made]))
"""


def test_a_dense_kmeans_fit_makes_only_the_dense_kernels():
    # The k-means kernels are made per layout (dense or CSR, a compile-time constant), so a dense
    # fit compiles none of the CSR branches; a CSR fit makes the other layout's kernels.
    out = subprocess.run([sys.executable, "-c", _KMEANS_PROBE], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[1, 1], [2, 2]]
