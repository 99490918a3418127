"""The GMM and k-means kernels built with AVX-512 targets' 512-bit accumulators (simd.VECTOR_BYTES
= 64), run on whatever CPU is here: LLVM splits the wider vectors where the CPU lacks AVX-512, so
the arithmetic and the layouts (sub-chunk columns, padding rows, blocks of rows) are the ones an
AVX-512 host runs. Every covariance type agrees with scikit-learn from the same initial
parameters, k-means with scikit-learn's Lloyd from the same centres.

Its own process with its own Numba cache: the kernels built here must not reach the shared cache,
whose entries are keyed on the target CPU and not on the vector width."""

import os
import subprocess
import sys

_PROBE = """
import warnings
import numpy as np
from fastlvm.kernels import simd
simd.VECTOR_BYTES = 64  # before any kernel is compiled
import fastlvm
from sklearn.cluster import KMeans as SKKMeans
from sklearn.mixture import GaussianMixture as SKGaussianMixture

warnings.simplefilter("ignore")  # the one-iteration starts do not converge
rng = np.random.default_rng(0)
# 4 clusters; 1,000 rows: a short last sub-chunk in every block
X = np.concatenate([rng.normal(size=(250, 7)) @ rng.normal(size=(7, 7)) * 0.3 + 4 * rng.normal(size=7)
                    for _ in range(4)])
start = SKGaussianMixture(4, covariance_type="full", max_iter=1, random_state=0).fit(X)
for cov, dtype in (("full", np.float32), ("full", np.float64), ("tied", np.float32), ("diag", np.float64),
                   ("diag", np.float32), ("spherical", np.float64)):
    sk = SKGaussianMixture(4, covariance_type=cov, max_iter=1, random_state=0).fit(X)
    init = dict(weights_init=start.weights_, means_init=start.means_, precisions_init=sk.precisions_)
    kw = dict(covariance_type=cov, max_iter=15, tol=0.0, reg_covar=1e-6, **init)
    ours = fastlvm.GaussianMixture(4, **kw).fit(X.astype(dtype))
    ref = SKGaussianMixture(4, **kw).fit(X)
    rtol = 1e-3 if dtype == np.float32 else 1e-8
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=rtol, atol=rtol * 10, err_msg=cov)
    np.testing.assert_allclose(ours.covariances_, ref.covariances_, rtol=rtol * 10, atol=rtol, err_msg=cov)
    np.testing.assert_allclose(ours.score_samples(X.astype(dtype)), ref.score_samples(X), rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(ours.predict(X.astype(dtype)), ref.predict(X))
C = X[rng.choice(len(X), 5, replace=False)]
for dtype in (np.float32, np.float64):
    ours = fastlvm.KMeans(5, init=C.astype(dtype), n_init=1).fit(X.astype(dtype))
    ref = SKKMeans(5, init=C.astype(dtype), n_init=1, algorithm="lloyd").fit(X.astype(dtype))
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    assert ours.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(ours.inertia_, ref.inertia_, rtol=1e-5 if dtype == np.float32 else 1e-12)
print("ok")
"""


def test_gmm_and_kmeans_kernels_with_512_bit_vectors_agree_with_scikit_learn(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")
