"""Dask arrays: block statistics on the workers of a two-process LocalCluster (one of them killed
mid-fit), summed in block order; the answer equals the in-memory fit from the same start.
Inference returns Dask arrays."""

import logging
import os
import signal
import sys
import time
import uuid
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.mixture import GaussianMixture as SkGaussianMixture  # noqa: E402

from fastlvm import GaussianMixture  # noqa: E402

# The block functions below run on the workers, which cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def mixture_data(n, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 2.5
    return centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))


def start(X, K, cov_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGaussianMixture(K, covariance_type=cov_type, max_iter=1, random_state=0).fit(X[:5000])
    return dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)


def fit(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(**kw).fit(X)


@pytest.fixture(scope="module")
def client():
    # One Numba thread per single-threaded worker: no oversubscription of the two cores.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.CRITICAL, env={"NUMBA_NUM_THREADS": "1"}) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _die_once_after(block, directory, calls_before_death):
    """Identity on a block, except that one call, after `calls_before_death` calls across all
    workers, kills its own worker process (SIGKILL: no clean-up, the nanny restarts it)."""
    open(os.path.join(directory, f"call-{uuid.uuid4().hex}"), "w").close()
    if len([f for f in os.listdir(directory) if f.startswith("call-")]) > calls_before_death:
        try:
            fd = os.open(os.path.join(directory, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return block
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return block


def test_worker_killed_mid_fit_does_not_change_the_answer(client, tmp_path):
    X = mixture_data(40_000)
    init = start(X, 3, "full")
    kw = dict(n_components=3, max_iter=5, tol=0, **init)
    pids = set(client.run(os.getpid).values())
    # 8 blocks per pass: a worker dies during the second of the five passes.
    Xd = da.from_array(X, chunks=(5_000, 5)).map_blocks(_die_once_after, str(tmp_path), 11, dtype=X.dtype)
    ours = fit(Xd, **kw)
    assert (tmp_path / "killed").exists()
    killed = int((tmp_path / "killed").read_text())
    assert killed in pids
    deadline = time.time() + 30
    while killed in set(client.run(os.getpid).values()) and time.time() < deadline:
        time.sleep(0.2)
    assert killed not in set(client.run(os.getpid).values())
    ref = fit(X, **kw)
    for name in FITTED:
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-9, name
    assert ours.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-9)
    assert ours.n_iter_ == ref.n_iter_ == 5


@pytest.mark.parametrize("cov_type", ["tied", "diag"])
def test_cluster_fit_and_lazy_inference_match_in_memory(client, cov_type):
    X = mixture_data(30_000, seed=1)
    Xd = da.from_array(X, chunks=(4_000, 2))  # column blocks are merged into whole rows
    kw = dict(n_components=3, covariance_type=cov_type, max_iter=10, tol=0, **start(X, 3, cov_type))
    ours, ref = fit(Xd, **kw), fit(X, **kw)
    for name in FITTED:
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-9, name
    assert ours.n_iter_ == ref.n_iter_
    labels, proba, ll = ours.predict(Xd), ours.predict_proba(Xd), ours.score_samples(Xd)
    for lazy in (labels, proba, ll):
        assert isinstance(lazy, da.Array)
    assert proba.shape == (X.shape[0], 3) and proba.chunks[0] == Xd.chunks[0]
    np.testing.assert_array_equal(labels.compute(), ref.predict(X))
    assert rel(proba.compute(), ref.predict_proba(X)) < 1e-9
    assert rel(ll.compute(), ref.score_samples(X)) < 1e-9
    assert ours.score(Xd) == pytest.approx(ref.score(X), rel=1e-9)
    assert ours.bic(Xd) == pytest.approx(ref.bic(X), rel=1e-9)


def test_initialisation_on_a_sample_gathered_from_the_workers(client):
    X = mixture_data(30_000, seed=4)
    kw = dict(n_components=3, max_iter=30, tol=1e-6, random_state=0)
    sampled = fit(da.from_array(X, chunks=(3_000, 5)), init_size=3_000, **kw)
    assert sampled.converged_
    assert sampled.score(X) == pytest.approx(fit(X, **kw).score(X), rel=1e-6)


def test_non_finite_value_in_a_block_names_its_global_row(client):
    X = mixture_data(6_000, seed=2)
    X[4321, 2] = np.nan
    Xd = da.from_array(X, chunks=(1_000, 5))
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 4321\)"):
        GaussianMixture(2, init_size=500).fit(Xd)
    fitted = GaussianMixture(2).fit(np.delete(X, 4321, axis=0))
    with pytest.raises(ValueError, match=r"first at row 4321"):
        fitted.predict(Xd).compute()
    with pytest.raises(ValueError, match=r"X has 4 features"):
        fitted.predict(Xd[:, :4])


def test_default_scheduler_without_a_client():
    """Dask's threaded scheduler (the default without a distributed client) gives the same fit."""
    import dask

    X = mixture_data(12_000, seed=3)
    kw = dict(n_components=3, covariance_type="spherical", max_iter=5, tol=0, **start(X, 3, "spherical"))
    with dask.config.set(scheduler="threads"):
        ours = fit(da.from_array(X, chunks=(2_500, 5)), **kw)
    ref = fit(X, **kw)
    for name in FITTED:
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-9, name
