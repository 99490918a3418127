"""Checkpoints: a fit killed (SIGKILL, in a subprocess) at any moment resumes to the uninterrupted
answer; a checkpoint of another model or a damaged file is refused and left as it was."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from fastlvm import GaussianMixture
from fastlvm.mixture import checkpoint as checkpoint_module

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")
KW = dict(n_components=3, n_init=2, tol=3e-5, max_iter=300, random_state=0, chunk_size=2_500)

# The fit in the subprocess streams the same rows with a pause per chunk so it can be killed mid-fit.
SCRIPT = textwrap.dedent("""
    import sys, time, warnings
    import numpy as np
    from fastlvm import GaussianMixture
    warnings.simplefilter("ignore")
    X = np.load(sys.argv[1])
    def slowly():
        for i in range(0, X.shape[0], 2_500):
            time.sleep(0.008)
            yield X[i : i + 2_500]
    GaussianMixture(**eval(sys.argv[3]), checkpoint=sys.argv[2]).fit(slowly)
""")


def overlapping_data(n=10_000, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 4)) * 1.2
    return centres[rng.integers(3, size=n)] + rng.normal(size=(n, 4))


def fit(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(**kw).fit(X)


def progress(path):
    """(init, n_iter) recorded in the checkpoint, or None before the first one."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return int(z["init"]), int(z["n_iter"])


@pytest.fixture(scope="module")
def uninterrupted():
    X = overlapping_data()
    ref = fit(X, **KW)
    assert 8 < ref.n_iter_ < KW["max_iter"]  # the resumed fit must also stop by convergence
    return X, ref


@pytest.mark.parametrize("kill_at", [(0, 4), (1, 3)], ids=["first-init", "second-init"])
def test_killed_fit_resumes_to_the_uninterrupted_answer(uninterrupted, tmp_path, kill_at):
    X, ref = uninterrupted
    np.save(tmp_path / "x.npy", X)
    path = str(tmp_path / "fit.ckpt.npz")
    # A passive OpenMP wait keeps the subprocess from spinning against this one on a busy machine.
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "x.npy"), path, repr(KW)], env=env)
    try:
        deadline = time.time() + 120
        while (progress(path) or (-1, -1)) < kill_at:
            assert proc.poll() is None, "the fit ended before it could be killed"
            assert time.time() < deadline, "no checkpoint progress"
            time.sleep(0.008)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = progress(path)  # a complete, loadable checkpoint survived the kill
    assert killed_at >= kill_at
    resumed = fit(X, **KW, checkpoint=path)
    for name in FITTED:
        np.testing.assert_allclose(getattr(resumed, name), getattr(ref, name), rtol=1e-12, atol=0, err_msg=name)
    assert resumed.n_iter_ == ref.n_iter_
    assert resumed.converged_ == ref.converged_
    assert resumed.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-13)
    np.testing.assert_allclose(resumed.lower_bounds_, ref.lower_bounds_, rtol=1e-13)
    # The checkpoint now holds the finished fit: fitting again resumes at the end.
    again = fit(X, **KW, checkpoint=path)
    np.testing.assert_array_equal(again.means_, resumed.means_)
    assert again.n_iter_ == resumed.n_iter_


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    X = overlapping_data(3_000, seed=1)
    path = tmp_path / "model.npz"
    fit(X, n_components=3, max_iter=3, random_state=0, checkpoint=path)
    assert path.exists()
    before = path.read_bytes()
    cases = [
        (dict(n_components=2), X, r"n_components = 3 there but 2 here"),
        (dict(n_components=3, covariance_type="diag"), X, r"covariance_type = 'full' there but 'diag' here"),
        (dict(n_components=3), X[:, :3], r"n_features = 4 there but 3 here"),
        (dict(n_components=3), X[:2_000], r"n_samples = 3000 there but 2000 here"),
        (dict(n_components=3), X.astype(np.float32), r"dtype = 'float64' there but 'float32' here"),
        (dict(n_components=3, n_init=2), X, r"n_init = 1 there but 2 here"),
    ]
    for params, data, match in cases:
        with pytest.raises(ValueError, match=match):
            fit(data, **params, max_iter=3, checkpoint=path)
        assert path.read_bytes() == before
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fastlvm checkpoint"):
        fit(X, n_components=3, max_iter=3, checkpoint=str(path))
    assert path.read_bytes() == b"not a checkpoint"


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    X = overlapping_data(3_000, seed=2)
    path = tmp_path / "model.npz"
    fit(X, n_components=2, max_iter=2, tol=0, random_state=0, checkpoint=path)
    before = path.read_bytes()
    real_savez = np.savez

    def savez_then_crash(f, **arrays):
        real_savez(f, **{k: v for k, v in list(arrays.items())[:3]})  # a partial file...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(checkpoint_module.np, "savez", savez_then_crash)
    with pytest.raises(OSError, match="disk full"):
        fit(X, n_components=2, max_iter=5, tol=0, random_state=0, checkpoint=path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]  # the temporary file was removed


def test_checkpoint_records_every_iteration(tmp_path):
    X = overlapping_data(3_000, seed=3)
    path = tmp_path / "model.npz"
    est = fit(X, n_components=2, max_iter=4, tol=0, random_state=0, checkpoint=path)
    with np.load(path, allow_pickle=False) as z:
        assert int(z["n_iter"]) == 4 and int(z["init"]) == 0
        np.testing.assert_array_equal(z["lower_bounds"], est.lower_bounds_)
        np.testing.assert_array_equal(z["means"].astype(est.means_.dtype), est.means_)
        assert str(z["covariance_type"]) == "full" and int(z["n_components"]) == 2
